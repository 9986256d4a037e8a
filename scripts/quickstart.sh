#!/usr/bin/env bash
# Quickstart: the appliance's main job on embedded defaults (soft keystore,
# files in a temporary directory, services on loopback only).
#
#   1. a personalisation keystore and a validation-only keystore holding the
#      same key handle with different flags (pyhsm's recommended practice);
#   2. YubiKey secrets generated inside the module, AEADs written in pyhsm's
#      v1 format and directory layout, secrets exported once for programming;
#   3. OTPs built the way a YubiKey builds them (and by Debian's ykgenerate,
#      when it is installed);
#   4. the KSM decoding them, and refusing bad ones;
#   5. the AEADs imported into the SQLite store, and the KSM as an HTTP
#      service on loopback (Yubico KSM protocol);
#   6. the validator on loopback (Yubico validation protocol 2.0): OTPs
#      validated by Debian's ykclient (or curl), a replay refused, and
#      pam_yubico logging a user in through pamtester when they are
#      installed and this runs as root;
#   7. two validator sites replicating over QUIC with mutual TLS (127.0.0.1
#      and 127.0.0.2): an API client and a new YubiKey's AEAD added at one
#      site reach the other, an OTP accepted at one is a replay at the other,
#      and with the peer gone a site fails closed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*" | sed "s#$work#\$WORK#g"; "$@"; }

say "Building (release)"
cargo build --release --quiet -p personalizer -p ksm -p validator -p replication
cargo build --release --quiet -p otp --example yubikey_sim
bin=target/release
sim=$bin/examples/yubikey_sim

work=$(mktemp -d)
server=
sites=()
pam_service=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null
  for p in "${sites[@]}"; do kill "$p" 2>/dev/null; done
  [ -n "$pam_service" ] && rm -f "/etc/pam.d/$pam_service"
  rm -rf "$work"
}
trap cleanup EXIT
umask 077
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/password"
# Cheap KDF for the demo only; the default is 64 MiB / 3 passes.
kdf=(--kdf-memory-mib 8 --kdf-iterations 1)

say "1. Keystores: the laptop's and the KSM's, one key handle with different flags"
# A throwaway pyhsm soft-HSM key file: one AES-256 key under handle 0x2000.
printf '{"8192": "%s"}\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > "$work/handle-key.json"
for ks in laptop ksm; do
  run $bin/personalizer keystore init --keystore "$work/$ks.keystore" --password-file "$work/password" "${kdf[@]}"
done
run $bin/personalizer keystore import-pyhsm --keystore "$work/laptop.keystore" --password-file "$work/password" --json "$work/handle-key.json" --flags personalizer
run $bin/ksm keystore import-pyhsm --keystore "$work/ksm.keystore" --password-file "$work/password" --json "$work/handle-key.json" --flags decode-only
rm -f "$work/handle-key.json"
run $bin/ksm keystore list --keystore "$work/ksm.keystore" --password-file "$work/password"
ls -l "$work/ksm.keystore" | awk '{print "keystore mode:", $1}'

say "2. Generate 3 YubiKeys inside the module"
run $bin/personalizer generate --keystore "$work/laptop.keystore" --password-file "$work/password" \
  --count 3 --start-public-id 1 --key-handles 0x2000 --out "$work/aeads" --yubikey-csv "$work/secrets.csv"
find "$work/aeads" -type f | sed "s#$work#\$WORK#" | sort
echo "AEAD file bytes (v1: magic, version, key handle, nonce, AEAD):"
od -An -tx1 "$work/aeads/0x2000/cc/cc/cc/cc/cc/cb/cccccccccccb" | tr -d '\n' | tr -s ' '; echo

say "3. Touch each YubiKey twice, as a YubiKey would build the OTPs"
otps=()
while IFS=, read -r n public_id uid key _; do
  for use in 0 1; do
    otps+=("$($sim "$public_id" "$uid" "$key" 1 "$use" $((RANDOM * 8)))")
  done
  if command -v ykgenerate >/dev/null; then
    # Debian's libyubikey builds one more, independently of our code.
    otps+=("$public_id$(ykgenerate "$key" "$uid" 0002 c0a8 00 00)")
  fi
done < "$work/secrets.csv"
printf '%s\n' "${otps[@]}"

say "4. The KSM decodes them (Yubico KSM protocol answers)"
for otp in "${otps[@]}"; do
  run $bin/ksm decrypt --keystore "$work/ksm.keystore" --password-file "$work/password" --aead-dir "$work/aeads" --key-handle 0x2000 "$otp"
done

say "5. ...and refuses what it must"
good=${otps[0]}
flip() { local s=$1 i=$2 c=${1:$2:1} r=c; [ "$c" = c ] && r=b; printf '%s%s%s' "${s:0:$i}" "$r" "${s:$((i+1))}"; }
echo "# a corrupted OTP:"
run $bin/ksm decrypt --keystore "$work/ksm.keystore" --password-file "$work/password" --aead-dir "$work/aeads" --key-handle 0x2000 "$(flip "$good" 20)" || true
echo "# an unknown YubiKey:"
run $bin/ksm decrypt --keystore "$work/ksm.keystore" --password-file "$work/password" --aead-dir "$work/aeads" --key-handle 0x2000 "vvvvvvvvvvvv${good:12}" || true
echo "# not modhex:"
run $bin/ksm decrypt --keystore "$work/ksm.keystore" --password-file "$work/password" --aead-dir "$work/aeads" --key-handle 0x2000 "hello-world" || true
echo "# the laptop's handle may generate but not decode:"
run $bin/ksm decrypt --keystore "$work/laptop.keystore" --password-file "$work/password" --aead-dir "$work/aeads" --key-handle 0x2000 "$good" || true
echo "# a wrong password:"
echo wrong > "$work/wrong"
run $bin/ksm decrypt --keystore "$work/ksm.keystore" --password-file "$work/wrong" --aead-dir "$work/aeads" --key-handle 0x2000 "$good" || true

say "6. The AEAD store, and ksm serve: the same over HTTP on loopback"
run $bin/ksm import --store "$work/aeads.db" --aead-dir "$work/aeads"
echo "# importing again changes nothing:"
run $bin/ksm import --store "$work/aeads.db" --aead-dir "$work/aeads"
$bin/ksm serve --keystore "$work/ksm.keystore" --password-file "$work/password" --store "$work/aeads.db" \
  --key-handles 0x2000 --listen 127.0.0.1:0 2> "$work/ksm.log" &
server=$!
for _ in $(seq 100); do grep -q 'serving http://' "$work/ksm.log" && break; sleep 0.05; done
addr=$(sed -n 's#.*serving http://\([^/]*\)/.*#\1#p' "$work/ksm.log")
[ -n "$addr" ] || { cat "$work/ksm.log"; exit 1; }
sed "s#$work#\$WORK#g" "$work/ksm.log"
for otp in "${otps[@]:0:3}" "$(flip "$good" 20)"; do
  printf '$ curl http://%s/wsapi/decrypt?otp=%s\n' "$addr" "$otp"
  curl -fsS "http://$addr/wsapi/decrypt?otp=$otp" || true
done
printf '$ curl http://%s/health\n' "$addr"; curl -fsS "http://$addr/health"
printf '$ curl http://%s/metrics | grep requests_total\n' "$addr"
curl -fsS "http://$addr/metrics" | grep '^ksm_decrypt_requests_total' | grep -v ' 0$'
kill -TERM "$server"; wait "$server"; server=
echo "(ksm serve stopped on SIGTERM)"

say "7. The validator: Yubico validation protocol 2.0 on loopback"
run $bin/validator client add --db "$work/validator.db" --keystore "$work/ksm.keystore" --password-file "$work/password" --id 1 | tee "$work/client"
apikey=$(sed -n 's/^key=//p' "$work/client")
$bin/validator serve --db "$work/validator.db" --keystore "$work/ksm.keystore" --password-file "$work/password" \
  --store "$work/aeads.db" --listen 127.0.0.1:0 2> "$work/validator.log" &
server=$!
for _ in $(seq 100); do grep -q 'serving http://' "$work/validator.log" && break; sleep 0.05; done
vaddr=$(sed -n 's#.*serving http://\([^/]*\)/.*#\1#p' "$work/validator.log")
[ -n "$vaddr" ] || { cat "$work/validator.log"; exit 1; }
url="http://$vaddr/wsapi/2.0/verify"
sed "s#$work#\$WORK#g" "$work/validator.log"
IFS=, read -r _ public_id uid key _ < "$work/secrets.csv"
# Counters 3 and up: the OTPs above (counters 1 and 2) were only decrypted,
# never validated, so the validator has not seen them; these are new anyway.
otp=$($sim "$public_id" "$uid" "$key" 3 0)
echo "# the raw answer (CRLF lines, signed with the client's key):"
printf '$ curl "%s?id=1&nonce=...&otp=%s&timestamp=1"\n' "$url" "$otp"
curl -fsS "$url?id=1&nonce=quickstartnonce0001&otp=$otp&timestamp=1" | tr -d '\r'
echo "# the same OTP again is a replay:"
curl -fsS "$url?id=1&nonce=quickstartnonce0002&otp=$otp" | grep '^status='
if command -v ykclient >/dev/null; then
  otp=$($sim "$public_id" "$uid" "$key" 4 0)
  echo "# Debian's ykclient signs its request and checks our signature:"
  run ykclient --url "$url" --apikey "$apikey" 1 "$otp" && echo "ykclient: exit 0 (OK)"
  run ykclient --url "$url" --apikey "$apikey" 1 "$otp" || echo "ykclient: exit $? (2 = replayed)"
else
  echo "(ykclient not installed: apt-get install libykclient-dev to see it validate)"
fi
if [ "$(id -u)" = 0 ] && command -v pamtester >/dev/null && [ -e /lib/security/pam_yubico.so ]; then
  echo "# pam_yubico, as a bastion host would run it (a throwaway PAM service):"
  pam_service="otp-quickstart-$$"
  echo "alice:$public_id" > "$work/authfile"
  printf 'auth required pam_yubico.so id=1 key=%s urllist=%s authfile=%s\naccount required pam_permit.so\n' \
    "$apikey" "$url" "$work/authfile" > "/etc/pam.d/$pam_service"
  otp=$($sim "$public_id" "$uid" "$key" 5 0)
  printf '$ echo <OTP> | pamtester %s alice authenticate\n' "$pam_service"
  echo "$otp" | pamtester "$pam_service" alice authenticate
  echo "# the same OTP again:"
  echo "$otp" | pamtester "$pam_service" alice authenticate || true
  rm -f "/etc/pam.d/$pam_service"; pam_service=
else
  echo "(pam_yubico demo skipped: it needs root, pamtester and libpam-yubico installed)"
fi
printf '$ curl http://%s/metrics | grep verify_requests_total\n' "$vaddr"
curl -fsS "http://$vaddr/metrics" | grep '^validator_verify_requests_total' | grep -v ' 0$'
kill -TERM "$server"; wait "$server"; server=
echo "(validator stopped on SIGTERM)"

say "8. Two sites replicating over QUIC with mutual TLS (a private CA)"
run $bin/replication ca init --dir "$work/pki" | sed "s#$work#\$WORK#g"
for site in auth1 auth2; do
  run $bin/replication cert issue --ca-dir "$work/pki" --name $site --out "$work/pki" | sed "s#$work#\$WORK#g"
done
# Each site: its copy of the validation keystore and of the AEAD store, its
# own database (no API client yet), and a [replication] section.
quic=(127.0.0.1:$((20000 + RANDOM % 20000)) 127.0.0.2:$((20000 + RANDOM % 20000)))
names=(auth1 auth2)
addrs=()
for i in 0 1; do
  dir="$work/${names[$i]}"; mkdir "$dir"
  cp "$work/ksm.keystore" "$work/aeads.db" "$dir/"
  cat > "$dir/validator.toml" <<TOML
listen = "127.0.0.1:0"
db = "$dir/validator.db"
keystore = "$dir/ksm.keystore"
password_file = "$work/password"
[ksm]
store = "$dir/aeads.db"
[replication]
site = $((i + 1))
listen = "${quic[$i]}"
certificate = "$work/pki/${names[$i]}.pem"
key = "$work/pki/${names[$i]}.key"
ca = "$work/pki/ca.pem"
deadline_ms = 1000
[[replication.peers]]
name = "${names[$((1 - i))]}"
site = $((2 - i))
addr = "${quic[$((1 - i))]}"
TOML
  $bin/validator serve --config "$dir/validator.toml" 2> "$dir/serve.log" &
  sites+=($!)
done
for i in 0 1; do
  for _ in $(seq 100); do grep -q 'serving http://' "$work/${names[$i]}/serve.log" && break; sleep 0.05; done
  addrs+=("$(sed -n 's#.*serving http://\([^/]*\)/.*#\1#p' "$work/${names[$i]}/serve.log")")
  [ -n "${addrs[$i]}" ] || { cat "$work/${names[$i]}/serve.log"; exit 1; }
done
echo "auth1: http://${addrs[0]} quic ${quic[0]}    auth2: http://${addrs[1]} quic ${quic[1]}"
echo "# at auth1 only: a new API client, and a new YubiKey generated on the laptop and imported"
run $bin/validator client add --db "$work/auth1/validator.db" --keystore "$work/auth1/ksm.keystore" --password-file "$work/password" --id 2 --notes "bastion" | grep -v '^key='
run $bin/personalizer generate --keystore "$work/laptop.keystore" --password-file "$work/password" \
  --count 1 --start-public-id 4 --key-handles 0x2000 --out "$work/aeads-new" --yubikey-csv "$work/secrets-new.csv" 2>&1 | tail -1 | sed "s#$work#\$WORK#g"
run $bin/ksm import --store "$work/auth1/aeads.db" --aead-dir "$work/aeads-new"
# An unknown YubiKey's OTP is BAD_OTP for a known client, NO_SUCH_CLIENT before.
probe="http://${addrs[1]}/wsapi/2.0/verify?id=2&nonce=quickstartprobe0001&otp=cccccccccccccccccccccccccccccccccccccccccccc"
for _ in $(seq 100); do curl -fsS "$probe" | grep -q '^status=NO_SUCH_CLIENT' || break; sleep 0.05; done
IFS=, read -r _ public_id uid key _ < "$work/secrets-new.csv"
otp=$($sim "$public_id" "$uid" "$key" 1 0)
echo "# the new YubiKey, as the new client, at auth2 (both sites store its counters before OK):"
curl -fsS "http://${addrs[1]}/wsapi/2.0/verify?id=2&nonce=quickstartnonce0101&otp=$otp" | grep '^status='
echo "# the same OTP at auth1:"
curl -fsS "http://${addrs[0]}/wsapi/2.0/verify?id=2&nonce=quickstartnonce0102&otp=$otp" | grep '^status='
# `validator status` exits 0 once every peer answered.
for _ in $(seq 100); do $bin/validator status --url "http://${addrs[0]}" >/dev/null && break; sleep 0.1; done
run $bin/validator status --url "http://${addrs[0]}" | grep -E '^(node|quorum|peer|sync):' | sed 's/ last_error=.*//'
echo "# auth2 stops; auth1 fails closed at its quorum deadline (1 s):"
kill -TERM "${sites[1]}"; wait "${sites[1]}" || true
otp=$($sim "$public_id" "$uid" "$key" 2 0)
curl -fsS "http://${addrs[0]}/wsapi/2.0/verify?id=2&nonce=quickstartnonce0103&otp=$otp" | grep '^status='
kill -TERM "${sites[0]}"; wait "${sites[0]}" || true
sites=()
echo "(both sites stopped)"

say "Done. Everything lived in a temporary directory, now removed."
