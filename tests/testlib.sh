# Shared by the scripted tests (tests/scripts/*.sh), after scripts/lib.sh:
# results, checks and expected errors. Scripts set NAME and PORT (the cluster)
# and, for expect_error's log of every message, FIXTURES; DB defaults to postgres.
fail=0
# The scripts run Python and the emulators from the tests' environment only.
ensure_python_env
ok() { echo "ok: $1"; }
not_ok() { echo "NOT OK: $1"; fail=1; }
check() { if [ "$2" = "$3" ]; then ok "$1"; else not_ok "$1: got '$2', expected '$3'"; fi; }
expect_error() { # expect_error LABEL SQLSTATE TEXT SQL
    local out
    out=$(psql_at "$NAME" "$PORT" -d "${DB:-postgres}" -qAt -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -c "$4" 2>&1)
    if grep -q "ERROR:  $2:" <<<"$out" && grep -q -- "$3" <<<"$out"; then ok "$1 ($2)"; else not_ok "$1: $out"; fi
    if [ -n "${FIXTURES:-}" ]; then echo "$out" >> "$FIXTURES/errors.log"; fi
}
# wait_for_audit_queue: until the audit writer has written every queued record (30 s at most)
wait_for_audit_queue() {
    local i
    for i in $(seq 300); do
        [ "$(psql_at "$NAME" "$PORT" -d "${DB:-postgres}" -qAt -c "SELECT (SELECT audit_queued FROM byok.broker_status()) = 0 AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE backend_type = 'byok catalog writer')")" = t ] && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------------------
# Revocation drills (issue: revocation with a stated bound). Scripts define the
# provider-specific actions as shell functions and call:
#
#   revocation_drill LABEL TENANT INTERVAL SQLSTATE TEXT REVOKE RESTORE [STOP CONT]
#
# TENANT is configured with cache_config {ttl_seconds: 86400,
# revocation_check_seconds: INTERVAL}. Three sessions read its values in a loop
# (psql \watch: one backend each, so their keys stay in the backends' caches
# under the 24 h TTL) and a fourth runs one long statement. REVOKE is run; every
# session must stop reading within INTERVAL + 1 s, failing with SQLSTATE and
# TEXT; requests meanwhile must not each reach the key manager; RESTORE must
# bring reads back within INTERVAL + 1 s, with no restart and no administrator.
# With STOP and CONT (an outage: the emulator stopped, then continued), reads
# must go on through the outage and nothing be treated as a revocation. The
# times are printed; the bound is checked.
REVOCATION_TABLE_ROWS=40
revocation_drill() {
    local label=$1 tenant=$2 interval=$3 sqlstate=$4 text=$5 revoke=$6 restore=$7 stop=${8:-} cont=${9:-}
    local db=${DB:-postgres} dir="$BYOK_WORK/drill-$NAME-$tenant" table="drill_$tenant" i
    rm -rf "$dir"; mkdir -p "$dir"
    dq() { psql_at "$NAME" "$PORT" -d "$db" -qAt "$@"; }
    echo "== revocation drill: $label (tenant $tenant, revocation_check_seconds $interval)"
    dq -c "SET client_min_messages = warning; DROP TABLE IF EXISTS $table; CREATE TABLE $table AS SELECT g AS id, byok.encrypt_text('$tenant', 'secret ' || g, '$table') AS v FROM generate_series(1, $REVOCATION_TABLE_ROWS) g" >/dev/null
    local read="SELECT extract(epoch FROM clock_timestamp()), count(*) FROM $table WHERE byok.decrypt_text(v, '$table') = 'secret ' || id"
    # A listener for byok_alerts, and the readers.
    # (psql prints notifications after each statement, not within \watch)
    { echo 'LISTEN byok_alerts;'; for i in $(seq 600); do echo 'SELECT pg_sleep(0.2);'; done; } \
        | psql_at "$NAME" "$PORT" -d "$db" -qAt > "$dir/alerts" 2>&1 &
    local listener=$!
    local readers=()
    for i in 1 2 3; do
        printf '%s\n\\watch 0.2\n' "$read" | psql_at "$NAME" "$PORT" -d "$db" -qAt -v VERBOSITY=verbose > "$dir/reader$i" 2>&1 &
        readers+=($!)
    done
    ( psql_at "$NAME" "$PORT" -d "$db" -qAt -v VERBOSITY=verbose -c "SELECT count(d.p) FROM generate_series(1, 3000) g CROSS JOIN LATERAL (SELECT byok.decrypt_text(v, '$table') AS p, pg_sleep(0.01) FROM $table WHERE id = 1 + g % $REVOCATION_TABLE_ROWS) d" > "$dir/long" 2>&1
      date +%s.%N > "$dir/long.end" ) &
    local long=$!
    # Every session has read (and cached the key) before the revocation.
    for i in $(seq 100); do
        [ "$(cat "$dir"/reader{1,2,3} 2>/dev/null | grep -c "|$REVOCATION_TABLE_ROWS\$")" -ge 3 ] && break
        sleep 0.1
    done
    sleep 1
    local calls_before
    calls_before=$(dq -c "SELECT coalesce(sum(kms_calls), 0) FROM byok.metrics WHERE tenant_id = '$tenant'")
    local t0
    t0=$(date +%s.%N)
    $revoke
    # Every session stops within the bound (waited for a little longer, to see it).
    local deadline=$(( $(date +%s) + interval + 8 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        local alive=0
        for i in "${readers[@]}" "$long"; do kill -0 "$i" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    local worst=0 stopped=1 line last
    for i in 1 2 3; do
        last=$(grep "|$REVOCATION_TABLE_ROWS\$" "$dir/reader$i" | tail -1 | cut -d'|' -f1)
        line=$("$PY" -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.2f}')" "${last:-0}" "$t0")
        echo "   reader $i: last successful read ${line} s after the revocation"
        grep -q "ERROR:  $sqlstate:" "$dir/reader$i" && grep -q -- "$text" "$dir/reader$i" || { stopped=0; echo "   reader $i ended with: $(tail -3 "$dir/reader$i" | tr '\n' ' ')"; }
        worst=$("$PY" -c "import sys; print(max(float(sys.argv[1]), float(sys.argv[2])))" "$worst" "$line")
    done
    if [ -s "$dir/long.end" ]; then
        line=$("$PY" -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.2f}')" "$(cat "$dir/long.end")" "$t0")
        echo "   the long statement failed ${line} s after the revocation, mid-statement"
        grep -q "ERROR:  $sqlstate:" "$dir/long" || { stopped=0; echo "   long statement ended with: $(tail -3 "$dir/long" | tr '\n' ' ')"; }
        worst=$("$PY" -c "import sys; print(max(float(sys.argv[1]), float(sys.argv[2])))" "$worst" "$line")
    else
        stopped=0; echo "   the long statement did not stop"
    fi
    for i in "${readers[@]}" "$long"; do kill "$i" 2>/dev/null; done
    [ $stopped = 1 ] && ok "$label: every session fails with $sqlstate ($text)" || not_ok "$label: not every session failed with $sqlstate"
    "$PY" -c "import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) + 1 else 1)" "$worst" "$interval" \
        && ok "$label: every session stopped within revocation_check_seconds + 1 s (worst ${worst} s, bound $((interval + 1)) s)" \
        || not_ok "$label: a session read for ${worst} s after the revocation (bound $((interval + 1)) s)"
    check "$label: the tenant's key status says revoked" "$(dq -c "SELECT status FROM byok.tenant_key_status WHERE tenant_id = '$tenant'")" "revoked"
    # A session hammering the revoked tenant costs the key manager nothing.
    local calls_mid calls_after
    calls_mid=$(dq -c "SELECT coalesce(sum(kms_calls), 0) FROM byok.metrics WHERE tenant_id = '$tenant'")
    for i in $(seq 30); do dq -c "$read" >/dev/null 2>&1; done
    calls_after=$(dq -c "SELECT coalesce(sum(kms_calls), 0) FROM byok.metrics WHERE tenant_id = '$tenant'")
    echo "   key-manager calls: $((calls_mid - calls_before)) from the revocation to every session stopped; $((calls_after - calls_mid)) during 30 more refused requests"
    [ $((calls_after - calls_mid)) -le 3 ] && ok "$label: refused requests are not each a key-manager call" \
        || not_ok "$label: $((calls_after - calls_mid)) key-manager calls for 30 refused requests"
    # Recovery: on its own, within one interval (+1 s).
    local t1 back=""
    t1=$(date +%s.%N)
    $restore
    for i in $(seq $(( (interval + 6) * 10 ))); do
        if [ "$(dq -c "SELECT count(*) FROM $table WHERE byok.decrypt_text(v, '$table') = 'secret ' || id" 2>/dev/null)" = "$REVOCATION_TABLE_ROWS" ]; then
            back=$("$PY" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.2f}')" "$t1"); break
        fi
        sleep 0.1
    done
    echo "   reads resumed ${back:-never} s after the key was enabled again"
    [ -n "$back" ] && "$PY" -c "import sys; sys.exit(0 if float(sys.argv[1]) <= float(sys.argv[2]) + 1 else 1)" "$back" "$interval" \
        && ok "$label: reads resume on their own within revocation_check_seconds + 1 s" \
        || not_ok "$label: reads did not resume within the bound (${back:-never})"
    check "$label: the tenant's key status says ok again" "$(dq -c "SELECT status FROM byok.tenant_key_status WHERE tenant_id = '$tenant'")" "ok"
    if [ -n "$stop" ]; then
        # An outage: reads go on from the caches; not a revocation.
        printf '%s\n\\watch 0.2\n' "$read" | psql_at "$NAME" "$PORT" -d "$db" -qAt -v VERBOSITY=verbose > "$dir/outage" 2>&1 &
        local reader=$!
        sleep 1
        $stop
        local waited=0 status=""
        while [ $waited -lt $(( interval + 12 )) ]; do
            status=$(dq -c "SELECT status FROM byok.tenant_key_status WHERE tenant_id = '$tenant'")
            [ "$status" = unreachable ] && break
            sleep 1; waited=$((waited + 1))
        done
        sleep 1
        kill -0 $reader 2>/dev/null && ok "$label: a session goes on reading through the outage ($(grep -c "|$REVOCATION_TABLE_ROWS\$" "$dir/outage") reads)" \
            || not_ok "$label: the reader stopped during the outage: $(tail -2 "$dir/outage" | tr '\n' ' ')"
        check "$label: the outage shows as unreachable, not revoked" "$status" "unreachable"
        $cont
        for i in $(seq $(( (interval + 8) * 2 ))); do
            [ "$(dq -c "SELECT status FROM byok.tenant_key_status WHERE tenant_id = '$tenant'")" = ok ] && break
            sleep 0.5
        done
        check "$label: after the outage the status is ok" "$(dq -c "SELECT status FROM byok.tenant_key_status WHERE tenant_id = '$tenant'")" "ok"
        kill $reader 2>/dev/null
    fi
    # Evidence: the audit trail and byok_alerts.
    wait_for_audit_queue
    check "$label: audit trail (revoked with the provider's reason, then restored)" \
        "$(dq -c "SELECT string_agg(event || ':' || outcome, ',' ORDER BY id) FROM byok.audit_log WHERE tenant_id = '$tenant' AND event IN ('master_key_revoked', 'master_key_restored') AND logged_at >= to_timestamp($t0) - interval '1 minute'")" \
        "master_key_revoked:failed,master_key_restored:ok"
    check "$label: the revocation record names the key and the reason" \
        "$(dq -c "SELECT reason IS NOT NULL AND details ? 'master_key_id' AND details ? 'reason_kind' FROM byok.audit_log WHERE tenant_id = '$tenant' AND event = 'master_key_revoked' ORDER BY id DESC LIMIT 1")" "t"
    sleep 1
    kill $listener 2>/dev/null
    # The payloads name audit rows (byok.alert_details adds the tenant and
    # reason); the rows name the tenant.
    local event ids
    for event in master_key_revoked master_key_restored; do
        ids=$(grep -o "\"audit_id\" : [0-9]*, \"event\" : \"$event\"" "$dir/alerts" | grep -o '[0-9]\+' | paste -sd, -)
        [ -n "$ids" ] && [ "$(dq -c "SELECT count(*) > 0 FROM byok.audit_log WHERE id IN ($ids) AND tenant_id = '$tenant'")" = t ] \
            && ok "$label: NOTIFY byok_alerts told of $event" \
            || not_ok "$label: no byok_alerts payload for $event ($(grep -c Asynchronous "$dir/alerts") notifications)"
    done
    wait "$listener" "${readers[@]}" "$long" 2>/dev/null
}

# ---------------------------------------------------------------------------
# Backup drill (issue: disaster recovery for every provider). A tenant whose
# primary is a local key and whose backup (encryption.backup) is PROVIDER with
# BLOCK: every data key is wrapped by both; with the local key file gone (the
# primary unreachable), every value is read through PROVIDER; with it back,
# the primary answers again.
#
#   backup_drill TENANT PROVIDER BLOCK_JSON
backup_drill() {
    local tenant=$1 provider=$2 block=$3 db=${DB:-postgres}
    local key_file="$BYOK_WORK/$NAME/data/byok_local_master.key" table="backup_$1"
    bq() { psql_at "$NAME" "$PORT" -d "$db" -qAt "$@"; }
    echo "== backup drill: a local primary, a $provider backup (tenant $tenant)"
    check "$provider as the backup: configure" "$(bq -c "SELECT byok.configure_tenant('{\"customer\":\"acme_corp\",\"tenant_id\":\"$tenant\",
        \"encryption\":{\"provider\":\"local\",\"local\":{\"key_id\":\"$tenant-cmk\"},
                        \"backup\":{\"provider\":\"$provider\",\"$provider\":$block}}}')")" "$tenant"
    check "$provider as the backup: the data key is wrapped by both" \
        "$(bq -c "SELECT has_primary_wrap, backup_provider, has_backup_wrap FROM byok.data_keys WHERE tenant_id = '$tenant'")" "t|$provider|t"
    bq -c "SET client_min_messages = warning; DROP TABLE IF EXISTS $table; CREATE TABLE $table AS SELECT g AS id, byok.encrypt_text('$tenant', 'b ' || g, '$table') AS v FROM generate_series(1, 20) g" >/dev/null
    mv "$key_file" "$key_file.away"
    bq -c "SELECT byok.flush_cache('$tenant')" >/dev/null
    check "$provider as the backup: every value read through it with the primary gone" \
        "$(bq -c "SELECT count(*) FROM $table WHERE byok.decrypt_text(v, '$table') = 'b ' || id")" "20"
    check "$provider as the backup: served_by_backup counts it" \
        "$(bq -c "SELECT coalesce(sum(served_by_backup), 0) > 0 FROM byok.metrics WHERE tenant_id = '$tenant' AND provider = '$provider'")" "t"
    mv "$key_file.away" "$key_file"
    bq -c "SELECT byok.flush_cache('$tenant')" >/dev/null
    check "$provider as the backup: the primary answers again" \
        "$(bq -c "SELECT count(*) FROM $table WHERE byok.decrypt_text(v, '$table') = 'b ' || id")" "20"
}

# ---------------------------------------------------------------------------
# Earlier releases, for the update tests (upgrade.sh, package.sh).
RELEASE_0_1_0_COMMIT=cdbdde834fe733b78822402ffcf88f48ed42559f   # byok_pg 0.1.0
# build_release VERSION COMMIT: byok_pg VERSION built from COMMIT (a debug build)
# and staged as `cargo pgrx package` stages it, in
# $BYOK_WORK/upgrade-build/pkg-VERSION; kept between runs and shared by the
# scripts. Its own target directory is seeded with hard links to this tree's
# debug build: the dependencies are the same, so only the byok crates compile.
# Sets RELEASE_STAGE.
build_release() {
    local version=$1 commit=$2 u="$BYOK_WORK/upgrade-build" d
    RELEASE_STAGE="$u/pkg-$version"
    [ "$(cat "$RELEASE_STAGE/.commit" 2>/dev/null)" = "$commit" ] && return 0
    log "building byok_pg $version (commit ${commit:0:7}, debug)"
    (cd "$BYOK_ROOT" && { git cat-file -e "$commit^{commit}" 2>/dev/null || git fetch -q origin "$commit"; }) \
        || die "commit $commit (byok_pg $version) is not in this clone (a shallow clone? fetch it)"
    local src="$u/src-$version" target="$u/target-$version"
    rm -rf "$src" "$RELEASE_STAGE" "$target"
    mkdir -p "$src"
    (cd "$BYOK_ROOT" && git archive "$commit") | tar -x -C "$src"
    local this_target="${CARGO_TARGET_DIR:-$BYOK_ROOT/target}/debug"
    if [ -d "$this_target/deps" ]; then
        mkdir -p "$target/debug"
        for d in deps build .fingerprint; do
            cp -al "$this_target/$d" "$target/debug/" 2>/dev/null || true
        done
        rm -rf "$target"/debug/{deps,build,.fingerprint}/*byok*
    fi
    (cd "$src" && CARGO_TARGET_DIR="$target" \
        cargo pgrx package --debug --pg-config "$PG_CONFIG" --out-dir "$RELEASE_STAGE" 2>&1 \
        | grep -E "^error|warning: unused|Finished" || true)
    [ -f "$RELEASE_STAGE/usr/lib/postgresql/${PG_MAJOR}/lib/byok_pg.so" ] || die "the $version build failed"
    echo "$commit" > "$RELEASE_STAGE/.commit"
    rm -rf "$target" "$src"
    log "byok_pg $version built"
}
