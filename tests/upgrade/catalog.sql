-- The extension's catalog in one database, one line per fact, without OIDs, sorted:
-- every member object, and in schema byok every function (signature, language,
-- attributes, body digest, privileges, comment), relation (kind, options,
-- row-level security, privileges, comment, view definition digest), column (in
-- order, type, default, privileges), constraint, index, trigger, policy,
-- sequence, type, cast, event trigger, the configuration tables pg_dump dumps, and
-- the initial privileges pg_dump compares with. Privileges are normalized (a
-- NULL ACL is written as its default). tests/scripts/upgrade.sh compares an
-- updated database's lines with a fresh install's.
CREATE FUNCTION pg_temp.acl(a aclitem[]) RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(a) x), '-') $$;
-- every object of the extension, described without OIDs, one line each
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'byok_pg'),
members AS (
  SELECT d.classid, d.objid, d.objsubid FROM pg_depend d, ext
   WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'),
lines AS (
  SELECT 'member ' || pg_describe_object(classid, objid, objsubid) AS l FROM members
  UNION ALL
  SELECT format('function %s(%s) returns %s lang=%s vol=%s strict=%s secdef=%s leak=%s par=%s kind=%s cost=%s rows=%s config=%s bin=%s src=%s acl=%s comment=%s',
         p.oid::regproc, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), l.lanname,
         p.provolatile, p.proisstrict, p.prosecdef, p.proleakproof, p.proparallel, p.prokind, p.procost, p.prorows,
         p.proconfig, p.probin,
         CASE WHEN l.lanname = 'c' THEN p.prosrc ELSE md5(p.prosrc) END,
         pg_temp.acl(coalesce(p.proacl, acldefault('f', p.proowner))), obj_description(p.oid, 'pg_proc'))
    FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
   WHERE p.pronamespace = 'byok'::regnamespace
  UNION ALL
  SELECT format('relation %s kind=%s persist=%s options=%s rls=%s force=%s acl=%s comment=%s viewdef=%s',
         c.relname, c.relkind, c.relpersistence, c.reloptions, c.relrowsecurity, c.relforcerowsecurity,
         pg_temp.acl(coalesce(c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner))), obj_description(c.oid, 'pg_class'),
         CASE WHEN c.relkind = 'v' THEN md5(pg_get_viewdef(c.oid)) END)
    FROM pg_class c WHERE c.relnamespace = 'byok'::regnamespace
  UNION ALL
  SELECT format('column %s.%s #%s %s notnull=%s default=%s acl=%s comment=%s',
         c.relname, a.attname, row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum),
         format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid), pg_temp.acl(a.attacl),
         col_description(c.oid, a.attnum))
    FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
   WHERE c.relnamespace = 'byok'::regnamespace AND c.relkind IN ('r', 'v', 'p', 'c', 'S')
  UNION ALL
  SELECT format('constraint %s on %s: %s', co.conname, co.conrelid::regclass, pg_get_constraintdef(co.oid))
    FROM pg_constraint co WHERE co.connamespace = 'byok'::regnamespace
  UNION ALL
  SELECT format('index %s', regexp_replace(pg_get_indexdef(i.indexrelid), 'INDEX \S+ ON', 'INDEX ON'))
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'byok'::regnamespace
  UNION ALL
  SELECT format('trigger %s enabled=%s', pg_get_triggerdef(t.oid), t.tgenabled)
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
   WHERE c.relnamespace = 'byok'::regnamespace AND NOT t.tgisinternal
  UNION ALL
  SELECT format('policy %s on %s cmd=%s permissive=%s roles=%s using=%s check=%s',
         po.polname, po.polrelid::regclass, po.polcmd, po.polpermissive,
         (SELECT array_agg(CASE WHEN r = 0 THEN 'public' ELSE r::regrole::text END ORDER BY 1) FROM unnest(po.polroles) r),
         pg_get_expr(po.polqual, po.polrelid), pg_get_expr(po.polwithcheck, po.polrelid))
    FROM pg_policy po JOIN pg_class c ON c.oid = po.polrelid WHERE c.relnamespace = 'byok'::regnamespace
  UNION ALL
  SELECT format('sequence %s type=%s start=%s inc=%s min=%s max=%s cache=%s cycle=%s',
         s.seqrelid::regclass, s.seqtypid::regtype, s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle)
    FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid WHERE c.relnamespace = 'byok'::regnamespace
  UNION ALL
  SELECT format('type %s type=%s len=%s byval=%s align=%s storage=%s in=%s out=%s recv=%s send=%s acl=%s',
         t.oid::regtype, t.typtype, t.typlen, t.typbyval, t.typalign, t.typstorage, t.typinput, t.typoutput,
         t.typreceive, t.typsend, pg_temp.acl(coalesce(t.typacl, acldefault('T', t.typowner))))
    FROM pg_type t WHERE t.typnamespace = 'byok'::regnamespace AND t.typtype <> 'c' AND t.typelem = 0
  UNION ALL
  SELECT format('event trigger %s on %s fn=%s enabled=%s tags=%s', e.evtname, e.evtevent, e.evtfoid::regproc,
         e.evtenabled, e.evttags)
    FROM pg_event_trigger e, members m WHERE m.classid = 'pg_event_trigger'::regclass AND m.objid = e.oid
  UNION ALL
  SELECT format('schema %s acl=%s', n.nspname, pg_temp.acl(coalesce(n.nspacl, acldefault('n', n.nspowner)))) FROM pg_namespace n WHERE n.nspname = 'byok'
  UNION ALL
  SELECT format('extension config %s condition=%s', cfg::regclass, cond)
    FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(cfg, cond) WHERE e.extname = 'byok_pg'
  UNION ALL
  SELECT format('init privs %s: %s', pg_describe_object(m.classid, m.objid, 0),
         pg_temp.acl(coalesce(i.initprivs, CASE m.classid
             WHEN 'pg_proc'::regclass THEN acldefault('f', (SELECT proowner FROM pg_proc WHERE oid = m.objid))
             WHEN 'pg_type'::regclass THEN acldefault('T', (SELECT typowner FROM pg_type WHERE oid = m.objid))
             WHEN 'pg_namespace'::regclass THEN acldefault('n', (SELECT nspowner FROM pg_namespace WHERE oid = m.objid))
             WHEN 'pg_class'::regclass THEN (SELECT acldefault(CASE relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", relowner) FROM pg_class WHERE oid = m.objid)
             END)))
    FROM members m LEFT JOIN pg_init_privs i ON i.classoid = m.classid AND i.objoid = m.objid AND i.objsubid = 0
   WHERE m.classid IN ('pg_proc'::regclass, 'pg_type'::regclass, 'pg_namespace'::regclass, 'pg_class'::regclass)
  UNION ALL
  SELECT format('init privs %s: %s', pg_describe_object(i.classoid, i.objoid, i.objsubid), pg_temp.acl(i.initprivs))
    FROM pg_init_privs i JOIN members m ON m.classid = i.classoid AND m.objid = i.objoid WHERE i.objsubid <> 0
  UNION ALL
  SELECT format('cast %s context=%s method=%s function=%s', pg_describe_object('pg_cast'::regclass, c.oid, 0),
         c.castcontext, c.castmethod, c.castfunc::regprocedure)
    FROM pg_cast c JOIN members m ON m.classid = 'pg_cast'::regclass AND m.objid = c.oid
)
SELECT l FROM lines ORDER BY l COLLATE "C";
