#!/usr/bin/env bash
# Per-row cost of byok_pg next to a plain scan and pgcrypto, on ROWS rows of
# VALUE_BYTES-byte values. Each round runs every query once, in alternating order;
# the figure is the median over ROUNDS rounds, in microseconds per row.
# Usage: bash bench/per_row.sh   [ROWS=200000 VALUE_BYTES=100 ROUNDS=7]
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
ROWS=${ROWS:-200000}
VALUE_BYTES=${VALUE_BYTES:-100}
ROUNDS=${ROUNDS:-7}
PORT=54340
ensure_toolchain
PROFILE=release install_extension
start_cluster bench $PORT "shared_buffers = '512MB'" "max_parallel_workers_per_gather = 0" "jit = off"
trap 'stop_cluster bench' EXIT
q() { psql_at bench $PORT -d postgres -qAt "$@"; }

log "loading $ROWS rows of $VALUE_BYTES-byte values"
q >/dev/null <<SQL
CREATE EXTENSION byok_pg;
CREATE EXTENSION pgcrypto;
SELECT byok.configure_tenant('{"customer":"bench","tenant_id":"bench","encryption":{"provider":"local","local":{"key_id":"bench-cmk"}}}');
CREATE TABLE t (id int, plain bytea, sealed byok.encrypted, pgc bytea);
INSERT INTO t SELECT g, p, byok.encrypt('bench', p), encrypt(p, '\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea, 'aes')
  FROM (SELECT g, gen_random_bytes(1)::bytea || substring(decode(repeat(md5(g::text), ($VALUE_BYTES / 16) + 2), 'hex') FROM 1 FOR $VALUE_BYTES - 1) AS p
          FROM generate_series(1, $ROWS) g) s;
VACUUM ANALYZE t;
SQL
q -c "SELECT 'check: ' || count(*) FILTER (WHERE byok.decrypt(sealed) = plain) || ' of ' || count(*) || ' rows open; value bytes ' || min(length(plain)) FROM t"

KEY="'\\x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'::bytea"
names=(plain_scan byok_decrypt byok_encrypt pgcrypto_decrypt pgcrypto_encrypt)
declare -A sql=(
  [plain_scan]="SELECT sum(length(plain)) FROM t"
  [byok_decrypt]="SELECT sum(length(byok.decrypt(sealed))) FROM t"
  [byok_encrypt]="SELECT count(byok.encrypt('bench', plain)) FROM t"
  [pgcrypto_decrypt]="SELECT sum(length(decrypt(pgc, $KEY, 'aes'))) FROM t"
  [pgcrypto_encrypt]="SELECT count(encrypt(plain, $KEY, 'aes')) FROM t"
)
declare -A times
time_query() { q -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p'; }
for name in "${names[@]}"; do time_query "${sql[$name]}" >/dev/null; done   # warm-up
for round in $(seq 1 "$ROUNDS"); do
    order=("${names[@]}")
    [ $((round % 2)) -eq 0 ] && order=($(printf '%s\n' "${names[@]}" | tac))
    for name in "${order[@]}"; do times[$name]+="$(time_query "${sql[$name]}") "; done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

echo
printf '%-18s %12s %10s\n' "query" "median ms" "us/row"
declare -A us
for name in "${names[@]}"; do
    ms=$(echo "${times[$name]}" | median)
    us[$name]=$(awk -v ms="$ms" -v rows="$ROWS" 'BEGIN {printf "%.3f", ms * 1000 / rows}')
    printf '%-18s %12.1f %10s\n' "$name" "$ms" "${us[$name]}"
done
echo
awk -v d="${us[byok_decrypt]}" -v p="${us[plain_scan]}" -v e="${us[byok_encrypt]}" \
    -v pd="${us[pgcrypto_decrypt]}" -v pe="${us[pgcrypto_encrypt]}" 'BEGIN {
    printf "byok.decrypt over plain scan: %.3f us/row (target <= 0.5)\n", d - p
    printf "pgcrypto decrypt / byok.decrypt, net of scan: %.1fx (target >= 3)\n", (pd - p) / (d - p)
    printf "pgcrypto encrypt / byok.encrypt, net of scan: %.1fx\n", (pe - p) / (e - p)
}'
echo "rows=$ROWS value_bytes=$VALUE_BYTES rounds=$ROUNDS cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
