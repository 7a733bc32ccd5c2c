-- Transparent mode: a view over a table with registered encrypted columns
-- (byok.protect_column) that shows them decrypted, and INSTEAD OF triggers
-- that seal what is written through it, so an ORM reads and writes plaintext
-- while the table stores byok.encrypted.
--
-- Nothing here runs with rights the caller does not have: the function is
-- SECURITY INVOKER, the view is security_invoker (the base table's privileges
-- and row-level security apply to whoever reads), and the trigger function is
-- SECURITY INVOKER (writes run as the writer, under its per-tenant grants).
-- The view and the trigger function are owned by the table's owner, whose
-- code (triggers, defaults, policies) the table's users already run.
-- The tenant column is the owner's explicit choice, checked against the
-- registry (which roles with UPDATE on a column may write), never taken from it.
-- pg_dump dumps the table's ciphertext and restores it with COPY into the
-- table, never through the view: nothing is sealed twice on restore.
CREATE FUNCTION byok.make_transparent(tbl regclass, tenant_column name DEFAULT NULL, view_name name DEFAULT NULL)
RETURNS regclass
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $make_transparent$
DECLARE
    rel record;
    view_ident text;
    fn_ident text;
    v_name name;
    pk_cols text[];
    cols text[] := '{}';
    select_list text[] := '{}';
    insert_values text[] := '{}';
    update_sets text[] := '{}';
    returning_sets text[] := '{}';
    returning_cols text[] := '{}';
    tenant_checks text := '';
    pk_match text;
    att record;
    reg record;
    tenant_expr_new text;
    tenant_expr_old text;
    n_encrypted int := 0;
    existing regclass;
    kept_grants text[] := '{}';
    g text;
    body text;
    overriding text := '';
    contexts jsonb := '{}';
    pinned jsonb;
    marker text;
BEGIN
    SELECT c.oid, c.relname, n.nspname, c.relkind, c.relowner INTO rel
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) tbl;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'byok.make_transparent: % is not a table', tbl
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT pg_catalog.pg_has_role(CURRENT_USER, rel.relowner, 'MEMBER') THEN
        RAISE EXCEPTION 'byok.make_transparent: only the owner of table % may give it a transparent view', tbl
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'the view and its trigger function are owned by the table''s owner';
    END IF;
    -- A parent's primary key is not unique across its inheritance children.
    IF rel.relkind OPERATOR(pg_catalog.=) 'r' AND EXISTS (
           SELECT FROM pg_catalog.pg_inherits WHERE inhparent OPERATOR(pg_catalog.=) tbl) THEN
        RAISE EXCEPTION 'byok.make_transparent: table % has inheritance children', tbl
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'give each child its own view (a partitioned table is supported)';
    END IF;
    IF tenant_column IS NOT NULL AND NOT EXISTS (
           SELECT FROM pg_catalog.pg_attribute
            WHERE attrelid OPERATOR(pg_catalog.=) tbl AND attname OPERATOR(pg_catalog.=) tenant_column
              AND attnum OPERATOR(pg_catalog.>) 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'byok.make_transparent: table % has no column %', tbl, pg_catalog.quote_ident(tenant_column)
            USING ERRCODE = 'undefined_column';
    END IF;
    -- The primary key identifies the row an UPDATE or DELETE through the view means.
    SELECT pg_catalog.array_agg(pg_catalog.quote_ident(a.attname::text) ORDER BY k.ord) INTO pk_cols
      FROM pg_catalog.pg_index i
      CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) k.attnum
     WHERE i.indrelid OPERATOR(pg_catalog.=) tbl AND i.indisprimary;
    IF pk_cols IS NULL THEN
        RAISE EXCEPTION 'byok.make_transparent: table % has no primary key', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'updates and deletes through the view find their row by its primary key';
    END IF;

    v_name := coalesce(view_name, (rel.relname || '_decrypted')::name);
    view_ident := pg_catalog.format('%I.%I', rel.nspname, v_name);
    fn_ident := pg_catalog.format('%I.%I', rel.nspname, v_name || '_write');
    IF tenant_column IS NOT NULL THEN
        tenant_expr_new := pg_catalog.format('NEW.%I', tenant_column);
        tenant_expr_old := pg_catalog.format('OLD.%I', tenant_column);
    ELSE
        tenant_expr_new := 'NULLIF(pg_catalog.current_setting(''byok.tenant'', true), '''')';
        tenant_expr_old := tenant_expr_new;
    END IF;

    FOR att IN
        SELECT a.attnum, a.attname, a.atttypid, a.attidentity
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid OPERATOR(pg_catalog.=) tbl AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
           AND a.attgenerated OPERATOR(pg_catalog.=) ''
         ORDER BY a.attnum
    LOOP
        SELECT r.tenant_column, r.context INTO reg FROM byok.protected_columns r
         WHERE r.table_name OPERATOR(pg_catalog.=) tbl AND r.column_name OPERATOR(pg_catalog.=) att.attname::text;
        cols := cols || pg_catalog.quote_ident(att.attname::text);
        IF FOUND THEN
            IF att.atttypid OPERATOR(pg_catalog.<>) 'byok.encrypted'::pg_catalog.regtype THEN
                RAISE EXCEPTION 'byok.make_transparent: registered column %.% is not byok.encrypted', tbl, att.attname
                    USING ERRCODE = 'datatype_mismatch';
            END IF;
            -- Re-encryption jobs read the registry's tenant column: the view must agree.
            IF reg.tenant_column IS DISTINCT FROM tenant_column THEN
                RAISE EXCEPTION 'byok.make_transparent: column %.% is registered with tenant column %, not %',
                        tbl, pg_catalog.quote_ident(att.attname), coalesce(pg_catalog.quote_ident(reg.tenant_column), '(none)'),
                        coalesce(pg_catalog.quote_ident(tenant_column), '(none)')
                    USING ERRCODE = 'object_not_in_prerequisite_state',
                          HINT = 'register the column with the tenant column you name here (byok.protect_column), or name the registered one';
            END IF;
            n_encrypted := n_encrypted + 1;
            contexts := contexts || pg_catalog.jsonb_build_object(att.attname::text, reg.context);
            select_list := select_list || pg_catalog.format('byok.decrypt_text(t.%I, %L) AS %I',
                                                            att.attname, reg.context, att.attname);
            insert_values := insert_values || pg_catalog.format('byok.encrypt_text(%s, NEW.%I, %L)',
                                                                tenant_expr_new, att.attname, reg.context);
            -- Unchanged plaintext under an unchanged tenant keeps its ciphertext.
            update_sets := update_sets || pg_catalog.format(
                '%1$I = CASE WHEN NEW.%1$I IS NOT DISTINCT FROM OLD.%1$I AND %2$s IS NOT DISTINCT FROM %3$s THEN t.%1$I ELSE byok.encrypt_text(%2$s, NEW.%1$I, %4$L) END',
                att.attname, tenant_expr_new, tenant_expr_old, reg.context);
            -- A STRICT byok.encrypt_text would turn a value with no tenant into NULL: refuse instead.
            tenant_checks := tenant_checks || pg_catalog.format(
                E'    IF NEW.%I IS NOT NULL AND %s IS NULL THEN\n' OPERATOR(pg_catalog.||)
                E'        RAISE EXCEPTION USING MESSAGE = %L, ERRCODE = ''null_value_not_allowed'', HINT = %L;\n' OPERATOR(pg_catalog.||)
                E'    END IF;\n',
                att.attname, tenant_expr_new,
                pg_catalog.format('no tenant to seal %I.%I under', rel.relname, att.attname),
                CASE WHEN tenant_column IS NOT NULL
                     THEN pg_catalog.format('set the row''s %s', tenant_column)
                     ELSE 'SET byok.tenant first' END);
        ELSE
            select_list := select_list || pg_catalog.format('t.%I', att.attname);
            insert_values := insert_values || pg_catalog.format('NEW.%I', att.attname);
            IF att.attidentity OPERATOR(pg_catalog.=) 'a' THEN
                -- GENERATED ALWAYS: the view's default draws the value, the insert keeps it.
                overriding := ' OVERRIDING SYSTEM VALUE';
            ELSE
                -- A column the writer did not change keeps what is stored (a concurrent change included).
                update_sets := update_sets || pg_catalog.format(
                    '%1$I = CASE WHEN NEW.%1$I IS NOT DISTINCT FROM OLD.%1$I THEN t.%1$I ELSE NEW.%1$I END', att.attname);
            END IF;
            -- What the table made of the row (defaults, other triggers) comes back to RETURNING.
            returning_cols := returning_cols || pg_catalog.format('t.%I', att.attname);
            returning_sets := returning_sets || pg_catalog.format('NEW.%I', att.attname);
        END IF;
    END LOOP;
    IF n_encrypted OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION 'byok.make_transparent: table % has no registered encrypted column', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'register each one first: SELECT byok.protect_column(table, column, tenant_column, context)';
    END IF;
    IF pg_catalog.cardinality(returning_cols) OPERATOR(pg_catalog.=) 0 THEN
        RAISE EXCEPTION 'byok.make_transparent: every column of % is encrypted', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'the primary key must be a plain column';
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.format('t.%1$s = OLD.%1$s', c), ' AND ') INTO pk_match
      FROM pg_catalog.unnest(pk_cols) c;

    -- Regenerating (after ALTER TABLE): only the view this function made of
    -- this table is replaced: owned by the table's owner, reading this table,
    -- written through this function's trigger. Its SELECT, INSERT, UPDATE and
    -- DELETE grants made by the owner are given again; nothing else is.
    existing := pg_catalog.to_regclass(view_ident);
    IF existing IS NOT NULL THEN
        IF NOT EXISTS (
               SELECT FROM pg_catalog.pg_class v
                WHERE v.oid OPERATOR(pg_catalog.=) existing AND v.relkind OPERATOR(pg_catalog.=) 'v'
                  AND v.relowner OPERATOR(pg_catalog.=) rel.relowner
                  AND EXISTS (SELECT FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d
                                ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                               AND d.objid OPERATOR(pg_catalog.=) r.oid
                               WHERE r.ev_class OPERATOR(pg_catalog.=) existing
                                 AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                                 AND d.refobjid OPERATOR(pg_catalog.=) tbl)
                  AND EXISTS (SELECT FROM pg_catalog.pg_trigger tg
                               WHERE tg.tgrelid OPERATOR(pg_catalog.=) existing
                                 AND tg.tgname OPERATOR(pg_catalog.=) 'byok_write'
                                 AND tg.tgfoid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(fn_ident OPERATOR(pg_catalog.||) '()'))) THEN
            RAISE EXCEPTION 'byok.make_transparent: % exists and is not byok_pg''s transparent view of %', view_ident, tbl
                USING ERRCODE = 'duplicate_table', HINT = 'pass another view_name, or drop it';
        END IF;
        -- The contexts the view was made with stay (the registry can be
        -- written by roles with UPDATE on a column): a column whose registered
        -- context changed since is refused until the owner drops the view.
        marker := pg_catalog.obj_description(existing, 'pg_class');
        pinned := CASE WHEN marker LIKE '%; contexts: {%'
                       THEN pg_catalog.substr(marker, pg_catalog.strpos(marker, '; contexts: ') + 12)::jsonb END;
        IF pinned IS NULL OR EXISTS (
               SELECT FROM pg_catalog.jsonb_each_text(pinned) p
                WHERE contexts ? p.key AND (contexts OPERATOR(pg_catalog.->>) p.key) IS DISTINCT FROM p.value) THEN
            RAISE EXCEPTION 'byok.make_transparent: a column of % is registered with another context than % was made with', tbl, view_ident
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = pg_catalog.format('made with %s, registered now %s', coalesce(pinned::text, '(unknown)'), contexts::text),
                      HINT = 'check byok.protected_columns; to accept the registration, drop the view (and its grants) and make it again';
        END IF;
        SELECT pg_catalog.array_agg(pg_catalog.format('GRANT %s ON %s TO %s', a.privilege_type, view_ident,
                   CASE WHEN a.grantee OPERATOR(pg_catalog.=) 0 THEN 'PUBLIC'
                        ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END))
          INTO kept_grants
          FROM pg_catalog.pg_class c, LATERAL pg_catalog.aclexplode(c.relacl) a
         WHERE c.oid OPERATOR(pg_catalog.=) existing AND a.grantee OPERATOR(pg_catalog.<>) c.relowner
           AND a.grantor OPERATOR(pg_catalog.=) c.relowner
           AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'DELETE');
        EXECUTE pg_catalog.format('DROP VIEW %s', view_ident);
        EXECUTE pg_catalog.format('DROP FUNCTION %s()', fn_ident);
    END IF;

    EXECUTE pg_catalog.format('CREATE VIEW %s WITH (security_invoker = true) AS SELECT %s FROM %s t',
                              view_ident, pg_catalog.array_to_string(select_list, ', '), tbl);
    -- The table's defaults (and identity sequences) apply to rows inserted through the view.
    FOR att IN
        SELECT a.attname,
               coalesce(pg_catalog.pg_get_expr(d.adbin, d.adrelid),
                        CASE WHEN a.attidentity OPERATOR(pg_catalog.<>) '' THEN
                             pg_catalog.format('pg_catalog.nextval(%L::pg_catalog.regclass)',
                                 pg_catalog.pg_get_serial_sequence(tbl::text, a.attname::text)) END) AS default_expr
          FROM pg_catalog.pg_attribute a
          LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid OPERATOR(pg_catalog.=) a.attrelid AND d.adnum OPERATOR(pg_catalog.=) a.attnum
         WHERE a.attrelid OPERATOR(pg_catalog.=) tbl AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
           AND a.attgenerated OPERATOR(pg_catalog.=) ''
    LOOP
        IF att.default_expr IS NOT NULL THEN
            EXECUTE pg_catalog.format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s', view_ident, att.attname, att.default_expr);
        END IF;
    END LOOP;

    -- The body is built apart and passed as one quoted literal: a context (set
    -- by byok_admin) holds any text, and must not be able to end a dollar quote.
    -- The table is written by name (static SQL); each call first checks that the
    -- name still means the table the view reads, so after a rename another
    -- role's table of the old name never receives the plaintext.
    body := pg_catalog.format($body$
DECLARE
    base pg_catalog.regclass;
    n pg_catalog.int8;
BEGIN
    -- The table the view reads (by OID), locked before its name is checked:
    -- once locked it cannot be renamed, so the name resolves to it until commit.
    SELECT DISTINCT d.refobjid::pg_catalog.regclass INTO base
      FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_depend d
        ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid OPERATOR(pg_catalog.=) r.oid
     WHERE r.ev_class OPERATOR(pg_catalog.=) TG_RELID
       AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.refobjid OPERATOR(pg_catalog.<>) TG_RELID;
    EXECUTE pg_catalog.format('LOCK TABLE ONLY %%s IN ROW EXCLUSIVE MODE', base);
    IF pg_catalog.to_regclass(%1$L) IS DISTINCT FROM base THEN
        RAISE EXCEPTION USING ERRCODE = 'object_not_in_prerequisite_state',
            MESSAGE = pg_catalog.format('the table behind %%s is no longer %%s', TG_RELID::pg_catalog.regclass, %1$L),
            HINT = 'the table was renamed or moved: regenerate the view with byok.make_transparent';
    END IF;
    IF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        DELETE FROM %1$s t WHERE %2$s;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n OPERATOR(pg_catalog.=) 0 THEN RETURN NULL; END IF;
        IF n OPERATOR(pg_catalog.>) 1 THEN
            RAISE EXCEPTION USING ERRCODE = 'cardinality_violation',
                MESSAGE = pg_catalog.format('a row of %%s matched %%s rows of %%s', TG_RELID::pg_catalog.regclass, n, base),
                HINT = 'the table''s primary key changed: regenerate the view with byok.make_transparent';
        END IF;
        RETURN OLD;
    END IF;
%3$s
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO %1$s AS t (%4$s)%9$s VALUES (%5$s)
        RETURNING %6$s INTO %7$s;
    ELSE
        UPDATE %1$s t SET %8$s WHERE %2$s
        RETURNING %6$s INTO %7$s;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n OPERATOR(pg_catalog.=) 0 THEN RETURN NULL; END IF;
        IF n OPERATOR(pg_catalog.>) 1 THEN
            RAISE EXCEPTION USING ERRCODE = 'cardinality_violation',
                MESSAGE = pg_catalog.format('a row of %%s matched %%s rows of %%s', TG_RELID::pg_catalog.regclass, n, base),
                HINT = 'the table''s primary key changed: regenerate the view with byok.make_transparent';
        END IF;
    END IF;
    RETURN NEW;
END
$body$,
        tbl::text, pk_match, tenant_checks,
        pg_catalog.array_to_string(cols, ', '), pg_catalog.array_to_string(insert_values, ', '),
        pg_catalog.array_to_string(returning_cols, ', '),
        pg_catalog.array_to_string(returning_sets, ', '),
        pg_catalog.array_to_string(update_sets, ', '), overriding);
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS %L',
        fn_ident, body);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER byok_write INSTEAD OF INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION %s()',
        view_ident, fn_ident);
    EXECUTE pg_catalog.format('COMMENT ON VIEW %s IS %L', view_ident,
                              pg_catalog.format('byok_pg transparent view of %s; contexts: %s', tbl, contexts::text));
    EXECUTE pg_catalog.format('ALTER VIEW %s OWNER TO %I', view_ident, pg_catalog.pg_get_userbyid(rel.relowner));
    EXECUTE pg_catalog.format('ALTER FUNCTION %s() OWNER TO %I', fn_ident, pg_catalog.pg_get_userbyid(rel.relowner));
    FOREACH g IN ARRAY coalesce(kept_grants, '{}') LOOP
        EXECUTE g;
    END LOOP;
    RETURN view_ident::regclass;
END
$make_transparent$;
COMMENT ON FUNCTION byok.make_transparent(regclass, name, name) IS
    'Creates (or regenerates) a view of a table showing its registered encrypted columns decrypted, sealing what is written through it';
