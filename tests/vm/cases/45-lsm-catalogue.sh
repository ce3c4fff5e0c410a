#!/bin/sh
# vm-timeout: 600
# The bypass catalogue (tests/catalogue/bypass.toml, built into the testkit) in the tier this boot
# gives: `lsm`, or `fmodret` with `cargo xtask vm --ubuntu-lsm`. The testkit starts an agent of its
# own on the catalogue's policy, runs every deletion row (as nobody unless the row says root, each
# in an audit session of its own) and asserts the row's outcome for the tier: the files left on
# disk, the hold, the incident. Rows `untested` for the tier (rsync: not in the VM) are skipped and
# the README says "not tested". Every failing row is listed.
. /cases/lib.inc
# The testkit's scratch trees live under /var/tmp, as on the host.
mkdir -p /var/tmp
GUARDRAIL_BIN=/bin/guardrail "$KIT" catalogue >"$S/catalogue.log" 2>&1
rc=$?
grep '^catalogue' "$S/catalogue.log"
grep -q "^catalogue: tier $TIER\$" "$S/catalogue.log" || {
    tail -40 "$S/catalogue.log"
    fail "the catalogue's agent did not run the $TIER tier"
}
[ $rc -eq 0 ] || { tail -60 "$S/catalogue.log"; fail "catalogue rows differ in the $TIER tier"; }
echo "catalogue: every row as bypass.toml says in the $TIER tier"
