#!/usr/bin/env bash
# Make a standalone SoftHSM2 token directory for manual experiments (pkcs11-tool, another
# hsmkeys config) without touching the system token directory.
#   softhsm/new-token.sh DIR [LABEL]      then:  export SOFTHSM2_CONF=DIR/softhsm2.conf
# The user PIN is generated into DIR/pin (mode 0600); the SO PIN into DIR/so-pin.
set -euo pipefail
dir=${1:?usage: softhsm/new-token.sh DIR [LABEL]}
label=${2:-hsmkeys}
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
chmod 700 "$dir/tokens"
sed "s|@TOKENDIR@|$dir/tokens|" "$(dirname "$0")/softhsm2.conf.in" > "$dir/softhsm2.conf"
umask 077
[ -s "$dir/pin" ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/pin"
[ -s "$dir/so-pin" ] || head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/so-pin"
export SOFTHSM2_CONF="$dir/softhsm2.conf"
if softhsm2-util --show-slots | grep -Eq "Label:[[:space:]]*$label[[:space:]]*\$"; then
    echo "token $label already exists in $dir"
else
    softhsm2-util --init-token --free --label "$label" --pin "$(cat "$dir/pin")" --so-pin "$(cat "$dir/so-pin")" >/dev/null
    echo "token $label created in $dir"
fi
echo "export SOFTHSM2_CONF=$dir/softhsm2.conf"
