#!/usr/bin/env bash
# Per-row cost of byok_pg next to a plain scan and pgcrypto (raw AES and
# pgp_sym_*), for 100-, 1000- and 4000-byte values (4000: a quarter of the rows),
# net of the plaintext's scan and net of reading each function's own input,
# byok_pg both as built (AES-GCM implementation picked by length) and pinned to
# RustCrypto's aes-gcm ("before": what every size used before aws-lc), and
# pgbench insert throughput plain vs encrypted. Each round runs every query once, in alternating order; figures
# are medians over ROUNDS rounds, in microseconds per row.
# Usage: bash bench/per_row.sh   [ROWS=200000 ROUNDS=7 SIZES="100 1000 4000" PGP_ROWS=10000
#                                 INSERT_SECONDS=10 INSERT_ROUNDS=5]
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ROWS=${ROWS:-200000}
ROUNDS=${ROUNDS:-7}
PORT=54340
ensure_toolchain
PROFILE=release install_extension
# No background work that would land in one run and not the other: autovacuum
# off (the tables are vacuumed explicitly), no checkpoint during the insert runs.
start_cluster bench $PORT "shared_buffers = '512MB'" "max_parallel_workers_per_gather = 0" "jit = off" \
    "autovacuum = off" "max_wal_size = '8GB'" "checkpoint_timeout = '30min'"
trap 'stop_cluster bench' EXIT
q() { psql_at bench $PORT -d postgres -qAt "$@"; }
die() { echo "error: $*" >&2; exit 1; }

KEY="'\\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea"
PGP_ROWS=${PGP_ROWS:-10000}
q >/dev/null <<SQL
CREATE EXTENSION byok_pg;
CREATE EXTENSION pgcrypto;
SELECT byok.configure_tenant('{"customer":"bench","tenant_id":"bench","encryption":{"provider":"local","local":{"key_id":"bench-cmk"}}}');
SQL
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
time_query() { q -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p'; }
declare -A result
for size in ${SIZES:-100 1000 4000}; do
    rows=$ROWS; [ "$size" -ge 4000 ] && rows=$((ROWS / 4))   # (the same time per query, roughly)
    log "loading $rows rows of $size-byte values"
    q >/dev/null <<SQL
DROP TABLE IF EXISTS t, t_sealed, t_pgc, t_pgp;
-- One table per representation: a row holding several 1000-byte columns would
-- cross the 2 kB TOAST threshold and push one of them out of line, measuring TOAST.
CREATE TABLE t AS
SELECT g AS id, substring(decode(repeat(md5(g::text), ($size / 16) + 2), 'hex') FROM 1 FOR $size) AS plain
  FROM generate_series(1, $rows) g;
CREATE TABLE t_sealed AS SELECT id, byok.encrypt('bench', plain) AS sealed FROM t;
CREATE TABLE t_pgc AS SELECT id, encrypt(plain, $KEY, 'aes') AS pgc FROM t;
CREATE TABLE t_pgp AS SELECT id, pgp_sym_encrypt_bytea(plain, 'bench-passphrase') AS pgp FROM t WHERE id <= $PGP_ROWS;
VACUUM ANALYZE t, t_sealed, t_pgc, t_pgp;
SQL
    check=$(q -c "SELECT count(*) FILTER (WHERE byok.decrypt(sealed) = plain) || '/' || count(*) || ' rows open, ' || min(length(plain)) || ' bytes' FROM t JOIN t_sealed USING (id)")
    echo "check: $check"
    names=(plain_scan sealed_scan pgcrypto_scan byok_decrypt byok_encrypt byok_decrypt_before byok_encrypt_before pgcrypto_decrypt pgcrypto_encrypt)
    declare -A sql=(
      [plain_scan]="SELECT sum(get_byte(plain, 0)) FROM t"   # (reads each value: length() would not detoast a long one)
      # The decrypting functions' own inputs, read the same way: a sealed or
      # pgcrypto value of 4000 bytes does not compress, so unlike the plaintext
      # it is stored out of line, and fetching it from TOAST is most of the
      # cost of any function reading it.
      [sealed_scan]="SELECT sum(get_byte(sealed::bytea, 0)) FROM t_sealed"
      [pgcrypto_scan]="SELECT sum(get_byte(pgc, 0)) FROM t_pgc"
      [byok_decrypt]="SET byok.aes_gcm_implementation = auto; SELECT sum(length(byok.decrypt(sealed))) FROM t_sealed"
      [byok_encrypt]="SET byok.aes_gcm_implementation = auto; SELECT count(byok.encrypt('bench', plain)) FROM t"
      [byok_decrypt_before]="SET byok.aes_gcm_implementation = rustcrypto; SELECT sum(length(byok.decrypt(sealed))) FROM t_sealed"
      [byok_encrypt_before]="SET byok.aes_gcm_implementation = rustcrypto; SELECT count(byok.encrypt('bench', plain)) FROM t"
      [pgcrypto_decrypt]="SELECT sum(length(decrypt(pgc, $KEY, 'aes'))) FROM t_pgc"
      [pgcrypto_encrypt]="SELECT count(encrypt(plain, $KEY, 'aes')) FROM t"
      [pgp_sym_decrypt]="SELECT sum(length(pgp_sym_decrypt_bytea(pgp, 'bench-passphrase'))) FROM t_pgp"
      [pgp_sym_encrypt]="SELECT count(pgp_sym_encrypt_bytea(plain, 'bench-passphrase')) FROM t WHERE id <= $PGP_ROWS"
    )
    declare -A times=()
    all=("${names[@]}" pgp_sym_decrypt pgp_sym_encrypt)
    for name in "${all[@]}"; do time_query "${sql[$name]}" >/dev/null; done   # warm-up
    for round in $(seq 1 "$ROUNDS"); do
        order=("${all[@]}")
        [ $((round % 2)) -eq 0 ] && order=($(printf '%s\n' "${all[@]}" | tac))
        for name in "${order[@]}"; do times[$name]+="$(time_query "${sql[$name]}") "; done
    done
    for name in "${all[@]}"; do
        ms=$(echo "${times[$name]}" | median)
        n=$rows; [[ $name == pgp_* ]] && n=$PGP_ROWS
        result[$size,$name]=$(awk -v ms="$ms" -v rows="$n" 'BEGIN {printf "%.3f", ms * 1000 / rows}')
    done
done

log "pgbench inserts (prepared, synchronous_commit off): ${INSERT_ROUNDS:-5} runs of ${INSERT_SECONDS:-10}s at 8 and at 1 client(s), plain, byok and pgcrypto inserts interleaved in each run"
q >/dev/null <<SQL
ALTER SYSTEM SET synchronous_commit = off;
SELECT pg_reload_conf();
CREATE TABLE ins_plain (id bigserial, v bytea);
CREATE TABLE ins_sealed (id bigserial, v byok.encrypted);
CREATE TABLE ins_pgcrypto (id bigserial, v bytea);
SQL
# 100 random-looking bytes per row: six md5 digests (96 bytes) and four more.
VALUE="decode(md5(:n::text) || md5((:n + 1)::text) || md5((:n + 2)::text) || md5((:n + 3)::text) || md5((:n + 4)::text) || md5((:n + 5)::text), 'hex') || '\\x01020304'::bytea"
printf '\\set n random(1, 1000000000)\nINSERT INTO ins_plain (v) VALUES (%s);\n' "$VALUE" > "$BYOK_WORK/bench/ins_plain.sql"
printf '\\set n random(1, 1000000000)\nINSERT INTO ins_sealed (v) VALUES (byok.encrypt(%s, %s));\n' "'bench'" "$VALUE" > "$BYOK_WORK/bench/ins_sealed.sql"
printf '\\set n random(1, 1000000000)\nINSERT INTO ins_pgcrypto (v) VALUES (encrypt(%s, %s, %s));\n' "$VALUE" "$KEY" "'aes'" > "$BYOK_WORK/bench/ins_pgcrypto.sql"
# Separate plain and encrypted runs on this VM differ by +-10% from one run to the
# next, more than the effect being measured. So each run mixes the scripts
# (pgbench picks one at random per transaction): all see the same machine at the
# same moment. pgbench logs every transaction's latency and script; for a closed
# loop without think time, throughput = clients / mean latency (Little's law), so
# the tps each kind of insert sustains is clients / its mean latency, and the
# encrypted/plain ratio is mean plain latency / mean encrypted latency.
mixed_run() { # mixed_run CLIENTS -> "plain_tps byok_tps pgcrypto_tps byok/plain pgcrypto/plain transactions"
    local dir="$BYOK_WORK/bench/pgbench-log"
    rm -rf "$dir"; mkdir -p "$dir"
    (cd "$dir" && "$PG_BIN/pgbench" -h "$BYOK_WORK/bench" -p $PORT -U postgres -n -M prepared -c "$1" -j "$(( $1 > 1 ? 2 : 1 ))" \
        -T "${INSERT_SECONDS:-10}" -l -f "$BYOK_WORK/bench/ins_plain.sql@1" -f "$BYOK_WORK/bench/ins_sealed.sql@1" \
        -f "$BYOK_WORK/bench/ins_pgcrypto.sql@1" postgres >/dev/null 2>&1) || die "pgbench failed"
    # Log columns: client, transaction, latency (us), script (0 plain, 1 byok, 2 pgcrypto), ...
    cat "$dir"/pgbench_log.* | awk -v c="$1" '{ n[$4]++; us[$4] += $3 }
        END { if (!n[0] || !n[1] || !n[2]) exit 1; p = us[0] / n[0]; e = us[1] / n[1]; g = us[2] / n[2];
              printf "%.0f %.0f %.0f %.4f %.4f %d\n", c * 1e6 / p, c * 1e6 / e, c * 1e6 / g, p / e, p / g, n[0] + n[1] + n[2] }'
}
declare -A ins
for clients in 8 1; do
    plain=""; sealed=""; pgc=""; ratios=""; pgc_ratios=""; txns=0
    for run in $(seq "${INSERT_ROUNDS:-5}"); do
        read -r p s g r gr n <<<"$(mixed_run "$clients")"
        [ -n "$n" ] || die "pgbench logged no transactions"
        plain+="$p "; sealed+="$s "; pgc+="$g "; ratios+="$r "; pgc_ratios+="$gr "; txns=$((txns + n))
    done
    ins[$clients]="$(echo "$plain" | median) $(echo "$sealed" | median) $(echo "$pgc" | median) $(echo "$ratios" | median) $(echo "$pgc_ratios" | median) $txns ($(echo $ratios | xargs printf '%.3f '))"
done
failed=$(q -c "SELECT (SELECT count(*) FROM ins_sealed WHERE length(byok.decrypt(v)) IS DISTINCT FROM 100)
                    + (SELECT count(*) FROM ins_pgcrypto WHERE length(decrypt(v, $KEY, 'aes')) IS DISTINCT FROM 100)
                    + (SELECT count(*) FROM ins_plain WHERE length(v) IS DISTINCT FROM 100)")
[ "$failed" = 0 ] || die "$failed inserted rows did not come back as 100 bytes"

echo
printf '%-20s %12s %12s %12s\n' "us/row" "100 B" "1000 B" "4000 B"
for name in plain_scan sealed_scan pgcrypto_scan byok_decrypt byok_encrypt byok_decrypt_before byok_encrypt_before pgcrypto_decrypt pgcrypto_encrypt pgp_sym_decrypt pgp_sym_encrypt; do
    printf '%-20s %12s %12s %12s\n' "$name" "${result[100,$name]:-}" "${result[1000,$name]:-}" "${result[4000,$name]:-}"
done
echo
for clients in 8 1; do
    read -r p s g r gr n rest <<<"${ins[$clients]}"
    printf 'pgbench insert tps (100-byte values, %d client(s), %d transactions): plain %.0f, byok %.0f, pgcrypto aes %.0f (medians); byok/plain per run: median %.1f%% %s (target >= 95%%); pgcrypto/plain %.1f%%\n' \
        "$clients" "$n" "$p" "$s" "$g" "$(awk -v r="$r" 'BEGIN {print 100 * r}')" "$rest" "$(awk -v r="$gr" 'BEGIN {print 100 * r}')"
done
for size in ${SIZES:-100 1000 4000}; do
    awk -v s="$size" -v d="${result[$size,byok_decrypt]}" -v p="${result[$size,plain_scan]}" -v e="${result[$size,byok_encrypt]}" \
        -v pd="${result[$size,pgcrypto_decrypt]}" -v pe="${result[$size,pgcrypto_encrypt]}" \
        -v db="${result[$size,byok_decrypt_before]}" -v eb="${result[$size,byok_encrypt_before]}" 'BEGIN {
        printf "%s B: byok.decrypt adds %.3f us/row over the scan%s; net of the scan, pgcrypto aes costs %.1fx byok.decrypt and %.1fx byok.encrypt (target >= 3x); against before (aes-gcm only): decrypt %.2fx, encrypt %.2fx faster net of the scan\n",
            s, d - p, (s == 100 ? " (target <= 0.2)" : ""), (pd - p) / (d - p), (pe - p) / (e - p), (db - p) / (d - p), (eb - p) / (e - p) }'
done
# The same, each function net of reading its own input (the plaintext for the
# encrypting ones, the sealed values for byok.decrypt, pgcrypto's ciphertext
# for decrypt()): what the function itself costs once its argument is fetched.
for size in ${SIZES:-100 1000 4000}; do
    awk -v s="$size" -v d="${result[$size,byok_decrypt]}" -v p="${result[$size,plain_scan]}" -v e="${result[$size,byok_encrypt]}" \
        -v ss="${result[$size,sealed_scan]}" -v ps="${result[$size,pgcrypto_scan]}" \
        -v pd="${result[$size,pgcrypto_decrypt]}" -v pe="${result[$size,pgcrypto_encrypt]}" \
        -v db="${result[$size,byok_decrypt_before]}" -v eb="${result[$size,byok_encrypt_before]}" 'BEGIN {
        printf "%s B, net of reading each function'"'"'s input: byok.decrypt %.3f us/row, byok.encrypt %.3f; pgcrypto aes costs %.1fx byok.decrypt and %.1fx byok.encrypt; against before (aes-gcm only): decrypt %.2fx, encrypt %.2fx faster\n",
            s, d - ss, e - p, (pd - ps) / (d - ss), (pe - p) / (e - p), (db - ss) / (d - ss), (eb - p) / (e - p) }'
done
echo "rows=$ROWS (pgp_sym: $PGP_ROWS) rounds=$ROUNDS cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
