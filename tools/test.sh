#!/bin/sh
# test.sh - the test command (make test): every spec on a real KVM.
#
# Usage (from the repository root): sh tools/test.sh [busted options]
#
# Where the specs run (LUAKVM_KVM, default auto; see tools/nested.sh):
#   host     this machine's /dev/kvm. On kvm_pvm (a software KVM that cannot run
#            a guest's user mode) the specs tagged userspace run nested instead.
#   nested   inside a first-level guest under QEMU TCG with kvm_amd.
#   auto     host when /dev/kvm is usable, else nested.
# LUAKVM_NESTED_TIMEOUT (default 2700 s) bounds a nested run; a nested run whose
# first-level guest froze (tools/nested.sh's exit status 123: its console went
# silent, heartbeat included) runs once more, and the summary says so. With
# --each a spec file that runs over LUAKVM_FILE_TIMEOUT s (1200) is killed and
# counted failed, and the files after it still run. Nested, each spec
# file runs in its own lua5.4 (`sh tools/test.sh --each [busted options] [files]`):
# one process loading the whole suite hit heap corruption there that no file
# alone shows, ASan does not see, and the host's KVM never showed (glibc
# "corrupted size vs. prev_size" in its first test; see tools/nested.sh).
# The last line is "N passed, N failed" over all parts; the exit status is
# non-zero when any part failed.
set -u
cd "$(dirname "$0")/.."
LUA=${LUA:-lua5.4}
NESTED_TIMEOUT=${LUAKVM_NESTED_TIMEOUT:-2700}
FILE_TIMEOUT=${LUAKVM_FILE_TIMEOUT:-1200}

# counted LOG CMD...: run CMD, stream its output and keep it in LOG; rc is its
# status, p and f the counts of its last "N passed, N failed" line (f at least 1
# when CMD failed)
counted() {
	log=$1; shift
	{ "$@"; echo $? >"$log.rc"; } 2>&1 | tee "$log"
	rc=$(cat "$log.rc")
	line=$(tr -d '\r' <"$log" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
	p=0 f=0
	if [ -n "$line" ]; then p=${line%% passed*}; f=${line#*, }; f=${f%% failed}; fi
	if [ "$rc" != 0 ] && [ "$f" = 0 ]; then f=1; fi
}

# --each: every spec file in a process of its own, here; one closing line
if [ "${1:-}" = --each ]; then
	shift
	opts= files=
	for a in "$@"; do
		case $a in -*) opts="$opts $a" ;; *) files="$files $a" ;; esac
	done
	[ -n "$files" ] || files=$(ls spec/*/*_spec.lua)
	out=$(mktemp)
	tp=0 tf=0 st=0
	for file in $files; do
		# shellcheck disable=SC2086
		counted "$out" timeout -k 10 "$FILE_TIMEOUT" "$LUA" spec/run.lua $opts "$file"
		case $rc in
		0) ;;
		124|137) st=1; echo "test.sh: $file: did not finish within $FILE_TIMEOUT s and was killed" ;;
		*) st=1; echo "test.sh: $file: exit $rc" ;;
		esac
		tp=$((tp + p)) tf=$((tf + f))
	done
	rm -f "$out" "$out.rc"
	echo "$tp passed, $tf failed"
	exit "$st"
fi

mode=$(sh tools/nested.sh detect) || exit 2
where=${mode%% *}
what=${mode#* }

# do the busted options already leave the userspace specs out?
userspace=1
for a in "$@"; do
	case $a in --exclude-tags=*e2e*|--exclude-tags=*userspace*) userspace=0 ;; esac
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/luakvm-test.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
passed=0 failed=0 status=0 parts=0

# part NAME CMD...: run, stream the output, add its closing counts
part() {
	name=$1; shift
	parts=$((parts + 1))
	t0=$(date +%s)
	counted "$TMP/part$parts" "$@"
	t1=$(date +%s)
	passed=$((passed + p)) failed=$((failed + f))
	[ "$rc" = 0 ] || status=1
	summary="${summary:-}test.sh: $name: $p passed, $f failed, exit $rc, $((t1 - t0)) s
"
}

# nested NAME CMD...: part, once more when the first-level guest froze (a fault
# of the emulator under the test, not of the specs: said in the summary)
nested() {
	was=$status
	part "$@"
	[ "$rc" = 123 ] || return 0
	passed=$((passed - p)) failed=$((failed - f)) status=$was
	summary="${summary}test.sh: $1: the first-level guest froze (see above); ran it once more
"
	echo "test.sh: $1: the first-level guest froze; running it once more"
	part "$@"
}

case $where in
host)
	echo "test.sh: the specs run on this machine's KVM ($what)"
	if [ "$what" = kvm_pvm ] && [ "$userspace" = 1 ]; then
		echo "test.sh: kvm_pvm cannot run a guest's user mode: the userspace specs run nested (tools/nested.sh)"
		part "host (kvm_pvm)" "$LUA" spec/run.lua --exclude-tags=userspace "$@"
		nested "nested (kvm_amd under QEMU TCG), userspace" \
			sh tools/nested.sh run -t "$NESTED_TIMEOUT" -- sh tools/test.sh --each --tags=userspace "$@" \
			$(grep -l '#userspace' spec/*/*_spec.lua)
	else
		part "host ($what)" "$LUA" spec/run.lua "$@"
	fi ;;
nested)
	echo "test.sh: no usable /dev/kvm here ($what): the specs run inside a first-level guest" \
		"under QEMU TCG with kvm_amd (tools/nested.sh; about a minute to set up the first time)"
	nested "nested (kvm_amd under QEMU TCG)" \
		sh tools/nested.sh run -t "$NESTED_TIMEOUT" -- sh tools/test.sh --each "$@" ;;
esac

if [ "$parts" -gt 1 ] || [ "$status" != 0 ]; then printf '%s' "$summary"; fi
echo "$passed passed, $failed failed"
[ "$status" = 0 ] && [ "$failed" = 0 ]
