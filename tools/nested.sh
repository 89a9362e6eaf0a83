#!/bin/sh
# nested.sh - a real KVM where /dev/kvm is missing: run a command inside a
# first-level Linux guest under QEMU's TCG, whose emulated AMD CPU has SVM, so
# Debian's generic kernel loads kvm_amd there and offers /dev/kvm.
#
# Usage (from the repository root):
#   sh tools/nested.sh prepare             fetch the kernel and build the initramfs (cached)
#   sh tools/nested.sh run [options] [--] CMD [ARG...]
#        -i, --interactive   connect this terminal to CMD (else stdin is not read)
#        -t, --timeout SECS  kill the guest after SECS (default 3600); exit status 124
#        (not interactive: a first-level guest whose console hears nothing, not even
#        its /init's heartbeat, for LUAKVM_NESTED_STALL s (300) froze: killed, with
#        QEMU's register dump, exit status 123)
#        -m, --mem SIZE      the first-level guest's memory (default 4G)
#   sh tools/nested.sh detect              print which KVM a run would use and why
#   sh tools/nested.sh auto [--userspace] [run options] [--] CMD [ARG...]
#        CMD on this machine's KVM when it is usable (LUAKVM_KVM=host|nested|auto,
#        default auto), else nested, saying so in one line first; --userspace:
#        CMD runs a guest's user mode, which kvm_pvm cannot, so nested there too
# LUAKVM_NESTED_CPU: QEMU's -cpu (see CPU below); LUAKVM_NESTED_KVM_AMD: options
# for kvm-amd.ko inside (e.g. "npt=0"); LUAKVM_NESTED_MEM: memory (4G).
#
# Inside: the host's / read-only at /, this checkout read-write at the same path,
# /proc /sys /dev as the guest's own (with /dev/kvm), /tmp a tmpfs; CMD runs in
# the checkout with the caller's PATH, TERM, LANG, LUAKVM_*, *SAN_OPTIONS and the
# bench's variables, HOME=/tmp and LUAKVM_NESTED=1. CMD's output streams to
# stdout as it happens (through the guest's second UART); its exit status is
# this script's. The guest kernel's own console goes to a log whose tail is
# printed when something goes wrong.
#
# Cache: $LUAKVM_NESTED_DIR (default .nested/ in the checkout, git-ignored):
# vmlinuz and the modules from Debian's linux-image-amd64 (the generic kernel:
# the cloud kernel has no 9p), and an initramfs of busybox-static, those modules
# and an /init. Needs qemu-system-x86 (make deps).
set -eu

me=nested.sh
say() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { printf '%s: error: %s\n' "$me" "$*" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${LUAKVM_NESTED_DIR:-$ROOT/.nested}
META_PKG=linux-image-amd64
# load order: each module after what it needs (all in linux-image-*-amd64)
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
9pnet 9pnet_virtio netfs fscache 9p irqbypass kvm ccp kvm-amd"
QEMU=${QEMU:-qemu-system-x86_64}
# The first-level CPU has no AVX (nor what needs it): with QEMU 7.2's TCG
# AVX/AVX2, badargs_spec alone corrupted lua5.4's heap there ("corrupted size
# vs. prev_size", glibc's string functions use AVX2), and passed with AVX off
# (-cpu or GLIBC_TUNABLES). One process loading the whole suite still did it
# without AVX and with npt=0, clean under ASan and on the host's KVM, which is
# why tools/test.sh runs each spec file in its own process here.
CPU=${LUAKVM_NESTED_CPU:-max,-avx,-avx2,-fma,-f16c,-vaes}
# a non-interactive run whose first-level console stays silent this long (its
# /init writes a heartbeat every 20 s) is a frozen guest: killed, exit status FROZE
STALL=${LUAKVM_NESTED_STALL:-300}
FROZE=123

TMP=
cleanup() { if [ -n "$TMP" ]; then rm -rf "$TMP"; fi; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi

# ---------------------------------------------------------------- prepare

prepare() {
	if [ -s "$CACHE/vmlinuz" ] && [ -s "$CACHE/initrd.cpio.gz" ] &&
		[ "$CACHE/initrd.cpio.gz" -nt "$ROOT/tools/nested-init.sh" ]; then return 0; fi
	command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is required (Debian 12)"
	command -v cpio >/dev/null 2>&1 || die "cpio is required (make deps)"
	busybox=/bin/busybox
	if ! [ -x "$busybox" ] || readelf -lW "$busybox" 2>/dev/null | grep -q INTERP; then
		die "$busybox is missing or not static: install busybox-static (make deps)"
	fi
	mkdir -p "$CACHE"
	TMP=$(mktemp -d "${TMPDIR:-/tmp}/luakvm-nested.XXXXXX")
	chmod 0755 "$TMP"
	mkdir "$TMP/deb"
	# apt fetches as its sandbox user _apt when it may write the folder
	if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$TMP/deb" || true; fi
	if ! apt-cache show "$META_PKG" >/dev/null 2>&1; then $SUDO apt-get update -q; fi
	say "apt-get download $META_PKG"
	(cd "$TMP/deb" && apt-get download -q "$META_PKG" 2>&1) >&2 || die "apt-get download $META_PKG failed"
	dep=$(dpkg-deb -f "$TMP"/deb/"$META_PKG"_*.deb Depends | sed 's/[,|]/\n/g' |
		grep -E '^ *linux-image-[0-9]' | head -n 1)
	pkg=$(printf '%s\n' "$dep" | sed -E 's/^ *([^ (]+).*/\1/')
	ver=$(printf '%s\n' "$dep" | sed -nE 's/.*\(= *([^)]+)\).*/\1/p')
	[ -n "$pkg" ] || die "no linux-image-<version> in $META_PKG's Depends"
	say "apt-get download $pkg${ver:+=$ver}"
	(cd "$TMP/deb" && apt-get download -q "$pkg${ver:+=$ver}" 2>&1) >&2 || die "apt-get download $pkg failed"
	dpkg-deb -x "$TMP"/deb/"$pkg"_*.deb "$TMP/k" || die "dpkg-deb -x failed"

	R=$TMP/initramfs
	mkdir -p "$R/bin" "$R/dev" "$R/proc" "$R/sys" "$R/host" "$R/run" "$R/lib/modules"
	cp "$busybox" "$R/bin/busybox"
	for a in sh mount umount insmod mkdir cat cut echo poweroff chroot sleep stty setsid sync tail; do
		ln -s busybox "$R/bin/$a"
	done
	for m in $MODULES; do
		ko=$(find "$TMP/k/lib/modules" -name "$m.ko" | head -n 1)
		[ -n "$ko" ] || die "$pkg has no $m.ko"
		cp "$ko" "$R/lib/modules/"
	done
	echo "$MODULES" | tr ' ' '\n' | grep . >"$R/lib/modules/order"
	cp "$ROOT/tools/nested-init.sh" "$R/init"
	chmod 0755 "$R/init"
	(cd "$R" && find . | sort | cpio -o -H newc -R 0:0 --quiet) | gzip -n >"$TMP/initrd" ||
		die "packing the initramfs failed"
	cp "$TMP"/k/boot/vmlinuz-* "$TMP/vmlinuz"
	mv "$TMP/initrd" "$CACHE/initrd.cpio.gz"
	mv "$TMP/vmlinuz" "$CACHE/vmlinuz"
	echo "$pkg ${ver:-}" >"$CACHE/kernel-version"
	say "$CACHE: $(cat "$CACHE/kernel-version"), $(wc -c <"$CACHE/initrd.cpio.gz") byte initramfs"
}

# ---------------------------------------------------------------- detect

# kvm_usable: /dev/kvm opens and answers KVM_GET_API_VERSION (through the core
# when it is built, else just the open)
kvm_usable() {
	[ -c /dev/kvm ] || { why="no /dev/kvm"; return 1; }
	if [ -f "$ROOT/kvm/core.so" ] && command -v lua5.4 >/dev/null 2>&1; then
		why=$(cd "$ROOT" && ASAN_OPTIONS=detect_leaks=0 lua5.4 -e 'package.cpath="./?.so;"..package.cpath
			local ok, kvm = pcall(require, "kvm.core")
			if not ok then print("kvm.core does not load") os.exit(1) end
			local v, msg = kvm.api_version()
			if not v then print(msg) os.exit(1) end
			local h = kvm.host_info()
			print(h.module or "kvm")') || return 1
		return 0
	fi
	if ( : </dev/kvm ) 2>/dev/null; then why=kvm; return 0; fi
	why="/dev/kvm does not open"; return 1
}

# mode: "host MODULE" or "nested REASON", from LUAKVM_KVM=host|nested|auto
mode() {
	case ${LUAKVM_KVM:-auto} in
	host)   kvm_usable || true; echo "host ${why:-}" ;;
	nested) echo "nested LUAKVM_KVM=nested" ;;
	auto)   if kvm_usable; then echo "host $why"; else echo "nested $why"; fi ;;
	*)      die "LUAKVM_KVM=${LUAKVM_KVM}: expected host, nested or auto" ;;
	esac
}

# ---------------------------------------------------------------- run

run() {
	interactive=0 timeout=3600 mem=${LUAKVM_NESTED_MEM:-4G}
	while [ $# -gt 0 ]; do
		case $1 in
		-i|--interactive) interactive=1; shift ;;
		-t|--timeout) timeout=$2; shift 2 ;;
		-m|--mem) mem=$2; shift 2 ;;
		--) shift; break ;;
		-*) die "unknown option $1" ;;
		*) break ;;
		esac
	done
	[ $# -gt 0 ] || die "run: no command"
	command -v "$QEMU" >/dev/null 2>&1 || die "$QEMU not found: install qemu-system-x86 (make deps)"
	prepare
	TMP=$(mktemp -d "${TMPDIR:-/tmp}/luakvm-nested-run.XXXXXX")
	# the command, its environment and its folder, for /init to run in the chroot
	{
		echo "cd '$ROOT' || exit 2"
		env | grep -E '^(LUAKVM_[A-Z0-9_]*|BUSTED_[A-Z0-9_]*|[A-Z]*SAN_OPTIONS|TERM|LANG|LC_ALL|PATH|ONLY|ROUNDS|BOOT_ROUNDS|EXITS|LIFECYCLES|VMLINUX|BOOT_TIMEOUT|DISK_ROUNDS|DISK_MIB|DISK_TIMEOUT|RANDREADS|EXITCOST_N[12]|FUZZ_SECONDS|RESETS|FUZZ_EXECS|SAVES)=' |
			grep -v '^LUAKVM_KVM=' | sed "s/'/'\\\\''/g; s/^\([^=]*\)=\(.*\)$/export \1='\2'/"
		echo "export LUAKVM_NESTED=1 HOME=/tmp"
		printf 'exec'
		for a in "$@"; do printf " '%s'" "$(printf '%s' "$a" | sed "s/'/'\\\\''/g")"; done
		echo
	} >"$TMP/cmd"
	echo "$interactive" >"$TMP/interactive"
	echo "$ROOT" >"$TMP/checkout"
	echo "${LUAKVM_NESTED_KVM_AMD:-}" >"$TMP/kvm_amd_options"

	if [ "$interactive" = 1 ]; then
		io="-chardev stdio,id=io,signal=off"
	else
		io="-chardev stdio,id=io,signal=on"
	fi
	# shellcheck disable=SC2086
	set -- "$QEMU" -M q35 -accel tcg -cpu "$CPU" -smp 1 -m "$mem" \
		-display none -monitor none -no-reboot \
		-kernel "$CACHE/vmlinuz" -initrd "$CACHE/initrd.cpio.gz" \
		-append "console=ttyS0 panic=-1 quiet loglevel=4 tsc=reliable clocksource=tsc luakvm.msize=${LUAKVM_NESTED_MSIZE:-262144}" \
		-serial "file:$TMP/console.log" $io -serial chardev:io \
		-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
		-virtfs "local,path=$ROOT,mount_tag=checkout,security_model=none,multidevs=remap" \
		-virtfs "local,path=$TMP,mount_tag=run,security_model=none"
	st=0
	if [ "$interactive" = 1 ]; then
		# --foreground: QEMU stays in the terminal's foreground process group
		# (timeout otherwise runs it in a group of its own, and QEMU, setting
		# the terminal up, is stopped by SIGTTOU: `make run` hung silently)
		timeout --foreground -k 10 "$timeout" "$@" || st=$?
	else
		# QEMU's monitor on two fifos, read only when the guest froze
		mkfifo "$TMP/mon.in" "$TMP/mon.out"
		set -- "$@" -chardev "pipe,id=mon,path=$TMP/mon" -mon chardev=mon,mode=readline
		timeout -k 10 "$timeout" "$@" </dev/null &
		qemu=$!
		watch "$qemu" || st=$?
		if [ "$st" = 0 ]; then wait "$qemu" || st=$?; fi
	fi
	if [ "$st" = "$FROZE" ]; then
		say "the first-level guest froze: its console heard nothing (not even /init's heartbeat) for $STALL s;" \
			"QEMU was killed. Its console's last lines:"
		console_tail
		say "the first-level CPU when it froze (QEMU's info registers):"
		grep -E '^(RAX|RSI|R8 |R12|RIP|ES |CS |SS |CR0|EFER)' "$TMP/registers" >&2 || true
		return "$FROZE"
	fi
	if [ "$st" = 124 ] || [ "$st" = 137 ]; then
		say "the nested guest did not finish within $timeout s and was killed; its console's last lines:"
		console_tail
		return 124
	fi
	if [ "$st" != 0 ]; then
		say "$QEMU exited with status $st; the nested guest's console's last lines:"
		console_tail
		return "$st"
	fi
	if ! [ -s "$TMP/rc" ]; then
		say "the nested guest stopped without the command's exit status; its console's last lines:"
		console_tail
		return 125
	fi
	return "$(cat "$TMP/rc")"
}

# the first-level console's last 30 lines but the heartbeat
console_tail() { grep -v '^nested-init: up ' "$TMP/console.log" | tail -n 30 >&2; }

# watch PID: wait while QEMU (PID) runs; the first-level guest's /init writes a
# heartbeat to the console every 20 s, so a console that stays the same size for
# STALL s means the guest froze (under TCG it has happened with a spec's nested
# guest running, once, printing nothing): ask QEMU's monitor for the registers,
# kill QEMU and return FROZE. Returns 0 when QEMU ended by itself.
watch() {
	size=-1 still=0
	while kill -0 "$1" 2>/dev/null; do
		sleep 5
		now=$(wc -c <"$TMP/console.log" 2>/dev/null || echo 0)
		if [ "$now" != "$size" ]; then size=$now still=0; continue; fi
		still=$((still + 5))
		[ "$still" -ge "$STALL" ] || continue
		{ echo "info registers"; sleep 2; } >"$TMP/mon.in" &
		timeout 5 cat "$TMP/mon.out" >"$TMP/registers" 2>/dev/null || true
		kill "$1" 2>/dev/null || true
		wait "$1" 2>/dev/null || true
		return "$FROZE"
	done
	return 0
}

# auto [--userspace] [run options] CMD...: on the host's KVM or nested
auto() {
	userspace=0
	if [ "${1:-}" = --userspace ]; then userspace=1; shift; fi
	m=$(mode)
	what=${m#* }
	case $m in
	"host kvm_pvm")
		if [ "$userspace" = 1 ]; then
			say "this /dev/kvm is kvm_pvm, which cannot run a guest's user mode: running nested, on kvm_amd under QEMU TCG"
			run "$@"; return
		fi ;;
	nested*)
		say "no usable /dev/kvm here ($what): running nested, on kvm_amd under QEMU TCG (about 10 s to start)"
		run "$@"; return ;;
	esac
	while [ $# -gt 0 ]; do
		case $1 in
		-i|--interactive) shift ;;
		-t|--timeout|-m|--mem) shift 2 ;;
		--) shift; break ;;
		*) break ;;
		esac
	done
	exec "$@"
}

case ${1:-} in
prepare) prepare ;;
auto)    shift; auto "$@" ;;
detect)  mode ;;
run)     shift; run "$@" ;;
*)       sed -n '2,/^set -eu/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
