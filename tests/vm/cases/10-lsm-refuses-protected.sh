#!/bin/sh
# First LSM test: with a policy that protects a scratch directory (a data directory no job here
# is named for), unlink inside it is refused by the kernel while unlinks elsewhere succeed.
. /cases/lib.inc
mkdir -p "$S/data" "$S/elsewhere" "$S/target" "$S/root"
for i in 1 2 3; do echo x >"$S/data/f$i"; echo x >"$S/elsewhere/f$i"; done
policy 100 "$S/target" "$S/root" "
[[deletion.data_dir]]
path = \"$S/data\"
owners = { units = [\"database.service\"] }" >"$S/policy.toml"
start_agent "$S/policy.toml"
gr status | grep -q "^tier:    $TIER " || fail "status does not say tier $TIER"

err=$(rm "$S/data/f1" 2>&1) && fail "rm inside the protected directory succeeded"
echo "refused as expected: $err"
echo "$err" | grep -q "Operation not permitted" || fail "expected EPERM, got: $err"
[ -e "$S/data/f1" ] || fail "the protected file is gone"
rm "$S/elsewhere/f1" || fail "rm elsewhere was refused"
[ ! -e "$S/elsewhere/f1" ] || fail "the unprotected file is still there"
rmdir "$S/root" 2>/dev/null && fail "rmdir of a protected root succeeded"
[ -d "$S/root" ] || fail "the protected root is gone"
[ "$(count "$S/data")" -eq 3 ] || fail "files in the data directory changed"
stop_agent
# Detached: the same unlink now succeeds.
rm "$S/data/f1" || fail "after the agent stopped, the unlink is still refused (programs left attached?)"
echo "ok: refused inside, allowed elsewhere, detached on SIGTERM"
