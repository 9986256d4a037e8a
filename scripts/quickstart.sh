#!/usr/bin/env bash
# Quickstart: the appliance's main job on embedded defaults (soft keystore,
# files in a temporary directory, services on loopback only).
#
#   1. the personalisation laptop: a keystore, the personalizer's home (its
#      signing key sealed under the keystore), two crypto officers whose
#      2FA keys are made and used with openssl, sessions opened with a
#      password and a signed challenge;
#   2. the key-handle ceremony under a 2-of-2 quorum: a key handle created
#      inside the module, the validation servers' decode-only keystore
#      exported;
#   3. YubiKey secrets generated inside the module: AEADs in pyhsm's v1
#      format and layout, a signed transfer bundle, the secrets exported
#      once (quorum), every step in the signed, hash-chained audit log;
#   4. OTPs built the way a YubiKey builds them (and by Debian's ykgenerate,
#      when it is installed);
#   5.–6. the KSM decoding them, and refusing bad ones;
#   7. the bundle verified and imported into the SQLite AEAD store, and the
#      KSM as an HTTP service on loopback (Yubico KSM protocol);
#   8. the validator on loopback (Yubico validation protocol 2.0): OTPs
#      validated by Debian's ykclient (or curl), a replay refused, and
#      pam_yubico logging a user in through pamtester when they are
#      installed and this runs as root;
#   9. two validator sites replicating over QUIC with mutual TLS (127.0.0.1
#      and 127.0.0.2): an API client and a new YubiKey's AEAD added at one
#      site reach the other, an OTP accepted at one is a replay at the other,
#      and with the peer gone a site fails closed.
#
#   scripts/quickstart.sh                  # soft keystores (the default)
#   scripts/quickstart.sh --hsm softhsm2   # the same flow on SoftHSM2 tokens
#
# With --hsm softhsm2 every security module is a PKCS#11 token in a
# throwaway SoftHSM2 directory (apt-get install softhsm2): the laptop's
# handle key is generated in its token and leaves it only for the servers'
# keystore (quorum), which each server loads into its own token, where the
# key can never leave again; YubiKey secrets come from the token's random
# generator and OTPs are decoded by the servers' tokens.
set -euo pipefail
cd "$(dirname "$0")/.."

hsm=soft
while [ $# -gt 0 ]; do
  case $1 in
    --hsm) hsm=${2:-}; shift 2 || { echo "--hsm needs soft or softhsm2" >&2; exit 2; } ;;
    --hsm=*) hsm=${1#--hsm=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done
case $hsm in
  soft|softhsm2) ;;
  *) echo "--hsm must be soft or softhsm2, not $hsm" >&2; exit 2 ;;
esac

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*" | sed "s#$work#\$WORK#g"; "$@"; }

tools=(openssl python3 curl)
[ "$hsm" = softhsm2 ] && tools+=(softhsm2-util)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "quickstart needs $tool (apt-get install $tool)" >&2; exit 1; }
done

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
echo wrong > "$work/wrong"

# The modules: soft keystores, or one SoftHSM2 token per machine, each
# named by an [hsm] table file (its PIN in a file).
if [ "$hsm" = softhsm2 ]; then
  mkdir -p "$work/softhsm2/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$work/softhsm2/tokens" > "$work/softhsm2/softhsm2.conf"
  export SOFTHSM2_CONF="$work/softhsm2/softhsm2.conf"
  head -c 6 /dev/urandom | od -An -tu2 | tr -d ' \n' | cut -c1-8 > "$work/pin"
  table() { # token label, PIN file
    printf '[hsm]\ntype = "pkcs11"\ntoken_label = "%s"\npin_file = "%s"\n' "$1" "$2"
  }
  for token in laptop auth auth1 auth2; do
    softhsm2-util --init-token --free --label "$token" --pin "$(cat "$work/pin")" --so-pin "$(cat "$work/pin")" >/dev/null
    table "$token" "$work/pin" > "$work/$token.hsm.toml"
  done
  table auth "$work/wrong" > "$work/wrong.hsm.toml"
  laptop_init=(--hsm-config "$work/laptop.hsm.toml")
  laptop=(--hsm-config "$work/laptop.hsm.toml")
  servers=(--hsm-config "$work/auth.hsm.toml")
  wrong=(--hsm-config "$work/wrong.hsm.toml")
else
  laptop_init=(--keystore "$work/laptop.keystore")
  laptop=(--keystore "$work/laptop.keystore" --password-file "$work/password")
  servers=(--keystore "$work/ksm.keystore" --password-file "$work/password")
  wrong=(--keystore "$work/ksm.keystore" --password-file "$work/wrong")
fi

say "1. The personalisation laptop ($hsm): module, home, two crypto officers with 2FA"
if [ "$hsm" = softhsm2 ]; then
  echo "# the laptop's module: SoftHSM2 token \"laptop\", named by an [hsm] table"
  sed "s#$work#\$WORK#g" "$work/laptop.hsm.toml"
else
  run $bin/personalizer keystore init --keystore "$work/laptop.keystore" --password-file "$work/password" "${kdf[@]}"
fi
export PERSONALIZER_HOME="$work/laptop" PERSONALIZER_KEYSTORE_PASSWORD_FILE="$work/password"
run $bin/personalizer init "${laptop_init[@]}" --hsm-id laptop-1
# Demo only: cheap operator password hashes (default 64 MiB, 3 passes).
sed -i 's/^operator_kdf_memory_mib = .*/operator_kdf_memory_mib = 8/' "$work/laptop/personalizer.toml"
# What an officer does with a challenge: sign its 32 bytes with their RSA
# key (openssl dgst -sha256 -sign), put the base64 signature back.
b64field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }
sign_b64() { # officer, base64 challenge -> signature file
  printf '%s' "$2" | base64 -d > "$work/$1.challenge"
  openssl dgst -sha256 -sign "$work/$1.key.pem" -out "$work/$1.sig" "$work/$1.challenge"
}
sign_authdata() { # officer, authdata file
  sign_b64 "$1" "$(b64field "$2" 'd["Data"][0]["Digest"]')"
  python3 -c 'import json,sys,base64
d=json.load(open(sys.argv[1])); d["Data"][0]["Signature"]=base64.b64encode(open(sys.argv[2],"rb").read()).decode()
json.dump(d,open(sys.argv[1],"w"))' "$2" "$work/$1.sig"
}
officer() { # name [session of the officer adding them]
  head -c 18 /dev/urandom | base64 > "$work/$1.pw"
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$work/$1.key.pem" 2>/dev/null
  openssl pkey -in "$work/$1.key.pem" -pubout -out "$work/$1.pub.pem"
  if [ -n "${2:-}" ]; then
    PERSONALIZER_SESSION="$work/$2.session" run $bin/personalizer operator add "$1" --password-file "$work/$1.pw"
  else
    run $bin/personalizer operator add "$1" --password-file "$work/$1.pw"
  fi
  run $bin/personalizer operator set-2fa "$1" --public-key "$work/$1.pub.pem" --authdata "$work/$1.2fa.json" --password-file "$work/$1.pw"
  sign_authdata "$1" "$work/$1.2fa.json"
  run $bin/personalizer operator set-2fa "$1" --authdata "$work/$1.2fa.json"
}
login() {
  run $bin/personalizer login "$1" --authdata "$work/$1.login.json" --password-file "$work/$1.pw" --session-out "$work/$1.session"
  sign_authdata "$1" "$work/$1.login.json"
  run $bin/personalizer login "$1" --authdata "$work/$1.login.json" --session-out "$work/$1.session"
}
approve() { # token file, approvers...
  local token=$1; shift
  for who in "$@"; do
    sign_b64 "$who" "$(b64field "$token" 'd["token"]')"
    PERSONALIZER_SESSION="$work/$who.session" run $bin/personalizer quorum approve --token "$token" --signature "$work/$who.sig"
  done
}
officer alice
login alice
officer bob alice
login bob
run $bin/personalizer operator list
export PERSONALIZER_SESSION="$work/alice.session"

say "2. The key-handle ceremony under a 2-of-2 quorum"
echo "# without approvals:"
run $bin/personalizer key-handle create --key-handle 0x2000 || true
run $bin/personalizer quorum request --operation create-key-handle --context 0x2000 --token-out "$work/kh.token"
approve "$work/kh.token" alice bob
run $bin/personalizer key-handle create --key-handle 0x2000 --approval "$work/kh.token"
echo "# the approval was single-use:"
run $bin/personalizer key-handle create --key-handle 0x2000 --approval "$work/kh.token" || true
echo "# the validation servers' keystore: the same handle key, decode-only, its own password"
run $bin/personalizer quorum request --operation export-keystore --context 0x2000 --token-out "$work/export.token"
approve "$work/export.token" alice bob
run $bin/personalizer key-handle export-servers --key-handles 0x2000 --out "$work/ksm.keystore" \
  --export-password-file "$work/password" "${kdf[@]}" --approval "$work/export.token"
ls -l "$work/ksm.keystore" | awk '{print "keystore mode:", $1}'
if [ "$hsm" = softhsm2 ]; then
  echo "# the validation server loads it into its own token (there the key can never leave)"
  run $bin/ksm keystore import-keystore "${servers[@]}" --from "$work/ksm.keystore" --from-password-file "$work/password"
fi
run $bin/ksm keystore list "${servers[@]}"

say "3. Generate 3 YubiKeys inside the module: AEADs, a signed bundle, the secrets once (quorum)"
run $bin/personalizer quorum request --operation plaintext-output --context "$work/secrets.csv" --token-out "$work/csv.token"
approve "$work/csv.token" alice bob
run $bin/personalizer generate --count 3 --start-public-id 1 --key-handles 0x2000 --out "$work/aeads" \
  --bundle "$work/keys.bundle" --yubikey-csv "$work/secrets.csv" --approval "$work/csv.token"
find "$work/aeads" -type f | sed "s#$work#\$WORK#" | sort
echo "AEAD file bytes (v1: magic, version, key handle, nonce, AEAD):"
od -An -tx1 "$work/aeads/0x2000/cc/cc/cc/cc/cc/cb/cccccccccccb" | tr -d '\n' | tr -s ' '; echo
echo "# public ids are never handed out twice:"
run $bin/personalizer generate --count 1 --start-public-id 2 --key-handles 0x2000 --out "$work/aeads2" || true
echo "# the audit log: who did what, with which approvals; chained and signed"
$bin/personalizer audit export | python3 -c 'import json,sys
for l in sys.stdin:
    e=json.loads(l)
    if e["type"]=="entry": print(e["seq"], e["operator"] or "-", e["action"], e["outcome"], ",".join(e["approvers"]))' | tail -8
run $bin/personalizer audit verify
unset PERSONALIZER_SESSION

say "4. Touch each YubiKey twice, as a YubiKey would build the OTPs"
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

say "5. The KSM decodes them (Yubico KSM protocol answers)"
for otp in "${otps[@]}"; do
  run $bin/ksm decrypt "${servers[@]}" --aead-dir "$work/aeads" --key-handle 0x2000 "$otp"
done

say "6. ...and refuses what it must"
good=${otps[0]}
flip() { local s=$1 i=$2 c=${1:$2:1} r=c; [ "$c" = c ] && r=b; printf '%s%s%s' "${s:0:$i}" "$r" "${s:$((i+1))}"; }
echo "# a corrupted OTP:"
run $bin/ksm decrypt "${servers[@]}" --aead-dir "$work/aeads" --key-handle 0x2000 "$(flip "$good" 20)" || true
echo "# an unknown YubiKey:"
run $bin/ksm decrypt "${servers[@]}" --aead-dir "$work/aeads" --key-handle 0x2000 "vvvvvvvvvvvv${good:12}" || true
echo "# not modhex:"
run $bin/ksm decrypt "${servers[@]}" --aead-dir "$work/aeads" --key-handle 0x2000 "hello-world" || true
echo "# the laptop's handle may generate but not decode:"
run $bin/ksm decrypt "${laptop[@]}" --aead-dir "$work/aeads" --key-handle 0x2000 "$good" || true
echo "# a wrong password or PIN:"
run $bin/ksm decrypt "${wrong[@]}" --aead-dir "$work/aeads" --key-handle 0x2000 "$good" || true

say "7. The AEAD store from the signed bundle, and ksm serve: the same over HTTP on loopback"
run $bin/ksm import --store "$work/aeads.db" --bundle "$work/keys.bundle" --trust "$work/laptop/signing-key.pub.pem"
echo "# importing again changes nothing:"
run $bin/ksm import --store "$work/aeads.db" --aead-dir "$work/aeads"
$bin/ksm serve "${servers[@]}" --store "$work/aeads.db" \
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

say "8. The validator: Yubico validation protocol 2.0 on loopback"
run $bin/validator client add --db "$work/validator.db" "${servers[@]}" --id 1 | tee "$work/client"
apikey=$(sed -n 's/^key=//p' "$work/client")
$bin/validator serve --db "$work/validator.db" "${servers[@]}" \
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

say "9. Two sites replicating over QUIC with mutual TLS (a private CA)"
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
  cp "$work/aeads.db" "$dir/"
  if [ "$hsm" = softhsm2 ]; then
    $bin/ksm keystore import-keystore --hsm-config "$work/${names[$i]}.hsm.toml" \
      --from "$work/ksm.keystore" --from-password-file "$work/password" | tail -1
    module=$(cat "$work/${names[$i]}.hsm.toml")
    site_module=(--hsm-config "$work/${names[$i]}.hsm.toml")
  else
    cp "$work/ksm.keystore" "$dir/"
    module=$(printf '[hsm]\ntype = "soft"\nkeystore = "%s"\npassword_file = "%s"' "$dir/ksm.keystore" "$work/password")
    site_module=(--keystore "$dir/ksm.keystore" --password-file "$work/password")
  fi
  [ "$i" = 0 ] && auth1_module=("${site_module[@]}")
  cat > "$dir/validator.toml" <<TOML
listen = "127.0.0.1:0"
db = "$dir/validator.db"
$module
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
run $bin/validator client add --db "$work/auth1/validator.db" "${auth1_module[@]}" --id 2 --notes "bastion" | grep -v '^key='
export PERSONALIZER_SESSION="$work/bob.session"
run $bin/personalizer quorum request --operation plaintext-output --context "$work/secrets-new.csv" --token-out "$work/csv2.token"
approve "$work/csv2.token" alice bob
run $bin/personalizer generate --count 1 --start-public-id 4 --key-handles 0x2000 --out "$work/aeads-new" \
  --bundle "$work/new.bundle" --yubikey-csv "$work/secrets-new.csv" --approval "$work/csv2.token" 2>&1 | tail -1 | sed "s#$work#\$WORK#g"
unset PERSONALIZER_SESSION
run $bin/ksm import --store "$work/auth1/aeads.db" --bundle "$work/new.bundle" --trust "$work/laptop/signing-key.pub.pem"
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
