#!/usr/bin/env bash
# Checks that the documentation covers everything byok_pg creates, and that its
# links resolve. Starts a cluster with the installed extension, lists
#   - every function, procedure and aggregate in schema byok (pg_proc),
#   - every table, view and materialized view in schema byok (pg_class),
#   - every type in schema byok that is not a relation's row type or an array,
#   - every GUC named byok.* (pg_settings, in a session that loaded the library),
#   - the roles and event triggers the extension creates,
# and fails, naming them, if any is not documented in README.md or docs/*.md.
# Documented means:
#   function:  `byok.NAME(` appears, or a Markdown table row starts with `NAME(` or `byok.NAME(`;
#   others:    the qualified name (byok.NAME, byok.guc_name) or, for roles and
#              event triggers, the bare name appears as a whole word.
# Then checks every relative link in README.md, SECURITY.md, ARCHITECTURE.md and
# docs/*.md: the file must exist and, for #anchors, the heading too.
# Usage: bash scripts/check-docs.sh   (needs the extension installed: scripts/test.sh
#        installs it first; DOCS_PORT to change the cluster's port, default 54331)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$BYOK_ROOT"
PORT="${DOCS_PORT:-54331}"
CLUSTER=docs-check

# Functions users never call, each with the reason. Keep this list short: an
# internal function that a superuser or an administrator might meet (a trigger,
# a helper in a stack trace) belongs in docs/internals.md instead.
declare -A NOT_DOCUMENTED=(
    [encrypted_in]="the type's text input function: PostgreSQL calls it for 'byok:...'::byok.encrypted (the text form is documented)"
    [encrypted_out]="the type's text output function, called by PostgreSQL (the text form is documented)"
    [encrypted_recv]="the type's binary input function, called by PostgreSQL (binary COPY, drivers)"
    [encrypted_send]="the type's binary output function, called by PostgreSQL (binary COPY, drivers)"
)

# Files that other changes are adding; a link to one of them is reported but
# does not fail the check until the file exists (then it is checked like any other).
# None today: ARCHITECTURE.md and docs/upgrading.md have landed.
PENDING_FILES=()

[ -f "$("$PG_CONFIG" --sharedir)/extension/byok_pg.control" ] \
    || die "byok_pg is not installed in $PG_CONFIG's server (bash scripts/test.sh installs it)"

shopt -s nullglob
DOCS=(README.md docs/*.md)
DOCTEXT="$(cat "${DOCS[@]}")"

start_cluster "$CLUSTER" "$PORT"
trap 'stop_cluster "$CLUSTER"' EXIT
q() { psql_at "$CLUSTER" "$PORT" -d postgres -qAt -c "LOAD 'byok_pg'" -c "$1"; }
psql_at "$CLUSTER" "$PORT" -d postgres -q -c "CREATE EXTENSION byok_pg"

mapfile -t functions < <(q "SELECT DISTINCT p.proname FROM pg_proc p
    JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'byok' ORDER BY 1")
mapfile -t relations < <(q "SELECT c.relname FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'byok' AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY 1")
mapfile -t types < <(q "SELECT t.typname FROM pg_type t
    JOIN pg_namespace n ON n.oid = t.typnamespace
    LEFT JOIN pg_class c ON c.oid = t.typrelid
    WHERE n.nspname = 'byok'
      AND (t.typrelid = 0 OR c.relkind = 'c')          -- not a table's or view's row type
      AND NOT (t.typcategory = 'A' AND t.typelem <> 0)  -- not an array type
    ORDER BY 1")
mapfile -t gucs < <(q "SELECT name FROM pg_settings WHERE name LIKE 'byok.%' ORDER BY 1")
mapfile -t words < <(q "SELECT rolname FROM pg_roles WHERE rolname LIKE 'byok\_%'
    UNION SELECT evtname FROM pg_event_trigger e
      JOIN pg_depend d ON d.classid = 'pg_event_trigger'::regclass AND d.objid = e.oid
      JOIN pg_extension x ON d.refobjid = x.oid AND x.extname = 'byok_pg'
    ORDER BY 1")

missing=()
has() { grep -Eq -- "$1" <<<"$DOCTEXT"; }
for f in "${functions[@]}"; do
    [ -n "${NOT_DOCUMENTED[$f]:-}" ] && continue
    has "byok\.$f\(" || has "^\|[[:space:]]*(CALL )?\`(byok\.)?$f\(" || missing+=("function byok.$f")
done
for r in "${relations[@]}"; do has "byok\.$r([^A-Za-z0-9_]|$)" || missing+=("table/view byok.$r"); done
for t in "${types[@]}"; do has "byok\.$t([^A-Za-z0-9_]|$)" || missing+=("type byok.$t"); done
for g in "${gucs[@]}"; do has "${g//./\\.}([^A-Za-z0-9_]|$)" || missing+=("GUC $g"); done
for w in "${words[@]}"; do has "(^|[^A-Za-z0-9_.])$w([^A-Za-z0-9_]|$)" || missing+=("role/event trigger $w"); done

[ ${#gucs[@]} -gt 0 ] || missing+=("(no byok.* GUC found: was the library loaded?)")
[ ${#functions[@]} -gt 0 ] || missing+=("(no function found in schema byok)")

echo "checked ${#functions[@]} functions (${#NOT_DOCUMENTED[@]} allow-listed), ${#relations[@]} tables and views," \
     "${#types[@]} types, ${#gucs[@]} GUCs, ${#words[@]} roles and event triggers against ${DOCS[*]}"
for f in $(printf '%s\n' "${!NOT_DOCUMENTED[@]}" | sort); do
    echo "  not documented on purpose: byok.$f — ${NOT_DOCUMENTED[$f]}"
done

# Relative links: file exists; #anchor matches a heading (GitHub's slugs).
link_errors="$(python3 - "${PENDING_FILES[@]}" -- README.md SECURITY.md ARCHITECTURE.md docs/*.md <<'PY'
import os, re, sys
args = sys.argv[1:]
pending = set(args[:args.index("--")])
files = [f for f in args[args.index("--") + 1:] if os.path.exists(f)]
def slugs(path):
    out, seen, fence = set(), {}, False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fence = not fence
        if fence or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        s = re.sub(r"[^\w\- ]", "", text.replace("`", "")).replace(" ", "-")
        n = seen.get(s, 0); seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out
errors = []
for f in files:
    text = re.sub(r"```.*?```", "", open(f, encoding="utf-8").read(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(f), path)) if path else f
        if not os.path.exists(dest):
            if dest in pending:
                print(f"note: {f} links to {dest}, which another change is adding", file=sys.stderr)
            else:
                errors.append(f"{f}: broken link {target} ({dest} does not exist)")
            continue
        if anchor and dest.endswith(".md") and anchor not in slugs(dest):
            errors.append(f"{f}: broken link {target} (no heading #{anchor} in {dest})")
for e in errors:
    print(e)
PY
)" || die "the link check could not run"
[ -z "$link_errors" ] || { echo "$link_errors"; missing+=("(the broken links above)"); }

if [ ${#missing[@]} -gt 0 ]; then
    echo "FAIL: not documented (add each to docs/reference.md, or docs/internals.md if only the extension uses it):"
    printf '  %s\n' "${missing[@]}"
    exit 1
fi
echo "every SQL object and GUC is documented; every link resolves (links to pending files: see the notes above)"
