#!/bin/sh
# fetch_kernel.sh - fetch a default guest kernel and initramfs for luakvm.
#
# Usage (from the repository root):  sh examples/fetch_kernel.sh [OUTDIR]
#
# Produces, in OUTDIR (default guest-kernel/):
#   bzImage            Debian's cloud kernel (linux-image-cloud-amd64), as shipped in /boot
#   vmlinux            the ELF kernel decompressed from the bzImage's LZ4 payload
#   modules/           the kernel package's virtio modules (virtio_ring, virtio, virtio_mmio,
#                      virtio_blk, virtio-rng, virtio_console), for the initramfs
#   initramfs.cpio.gz  busybox-static + the modules + an /init that loads them, prints
#                      LUAKVM-INIT-OK and starts busybox init, which runs a shell on the
#                      console and on `poweroff` or `reboot` ends the system the way a
#                      distribution's init does; with root=DEVICE on the kernel command
#                      line (root=/dev/vda: the first virtio disk) it mounts DEVICE
#                      instead (rootfstype=, rootflags=, and ro, the default, or rw, as
#                      the kernel takes them) and switch_root's to its init= (default
#                      /sbin/init, else /bin/sh)
#
# Needs Debian (apt-get, dpkg-deb) on amd64. Installs lz4, busybox-static, cpio, gzip and
# binutils when missing (as root, or through sudo). A second run with all three files
# present does nothing and needs no network.
set -eu

OUTDIR=${1:-guest-kernel}
OUTDIR=${OUTDIR%/}
BZIMAGE=$OUTDIR/bzImage
VMLINUX=$OUTDIR/vmlinux
INITRAMFS=$OUTDIR/initramfs.cpio.gz
# the initramfs's contents: bump when /init or /etc/inittab below change, and
# a second run rebuilds the initramfs (and only it)
INITRAMFS_VERSION=4
INITRAMFS_STAMP=$OUTDIR/.initramfs-version
MODULES=$OUTDIR/modules
# the virtio drivers, in load order (each needs the ones before it); modules
# (=m) in Debian's cloud kernel, which has no virtio-mmio command-line devices:
# the VMM describes its devices in the ACPI DSDT (LNRO0005)
VIRTIO_MODULES="virtio_ring virtio virtio_mmio virtio_blk virtio-rng virtio_console"
META_PKG=linux-image-cloud-amd64
LZ4_MAGIC='\x02\x21\x4c\x18'     # LZ4 legacy frame, as the kernel's "lz4 -l" writes it

export LC_ALL=C

me=fetch_kernel.sh
say()  { printf '%s: %s\n' "$me" "$*"; }
die()  { printf '%s: error: %s\n' "$me" "$*" >&2; exit 1; }

TMP=
cleanup() { if [ -n "$TMP" ]; then rm -rf "$TMP"; fi; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers

# size in bytes of a file
fsize() { wc -c <"$1" | tr -d ' '; }

# human-readable size: "53 MB", "812 KB"
human() {
	n=$(fsize "$1")
	if [ "$n" -ge 1048576 ]; then echo "$(( (n + 524288) / 1048576 )) MB"
	else echo "$(( (n + 512) / 1024 )) KB"; fi
}

# le FILE OFFSET NBYTES: unsigned little-endian integer (NBYTES <= 8) read with od
le() {
	# shellcheck disable=SC2046
	set -- $(od -An -v -t u1 -j "$2" -N "$3" "$1")
	v=0 s=0
	for b in "$@"; do v=$(( v | (b << s) )); s=$(( s + 8 )); done
	echo "$v"
}

hex() { printf '0x%x' "$1"; }

# first GLOB: the first existing path a glob expands to, or nothing
first() { for p in "$@"; do if [ -e "$p" ]; then echo "$p"; return 0; fi; done; }

# bytes FILE OFFSET N: N bytes as a hex string without spaces ("02214c18")
bytes() { od -An -v -t x1 -j "$2" -N "$3" "$1" | tr -d ' \n'; }

# the kernel release string the bzImage header points to (kernel_version at 0x20e, +0x200)
bz_release() {
	kv=$(le "$1" $((0x20e)) 2)
	[ "$kv" -ne 0 ] || return 0
	dd if="$1" bs=1 skip=$(( kv + 0x200 )) count=128 2>/dev/null | tr '\0' '\n' | head -n 1 | cut -d' ' -f1
}

is_elf_x86_64() {
	[ "$(bytes "$1" 0 4)" = 7f454c46 ] || return 1
	readelf -h "$1" 2>/dev/null | grep -q 'Machine:.*X86-64'
}

# ---------------------------------------------------------------- step 0: already done?

have_all=1
if [ -s "$INITRAMFS" ] && [ "$(cat "$INITRAMFS_STAMP" 2>/dev/null)" != "$INITRAMFS_VERSION" ]; then
	say "$INITRAMFS is from an older fetch_kernel.sh: building it again"
	rm -f "$INITRAMFS"
fi
for f in "$BZIMAGE" "$VMLINUX" "$INITRAMFS"; do [ -s "$f" ] || have_all=0; done
[ -d "$MODULES" ] || have_all=0

report() {
	rel=$(bz_release "$BZIMAGE")
	echo "$BZIMAGE: Linux x86 bzImage, boot protocol $(printf '%d.%02d' \
		$(( $(le "$BZIMAGE" $((0x206)) 2) >> 8 )) $(( $(le "$BZIMAGE" $((0x206)) 2) & 255 ))), release $rel ($(human "$BZIMAGE"))"
	if command -v readelf >/dev/null 2>&1; then
		entry=$(readelf -h "$VMLINUX" | sed -n 's/.*Entry point address: *//p')
		nload=$(readelf -lW "$VMLINUX" | grep -c ' LOAD ')
		echo "$VMLINUX: ELF 64-bit x86-64 executable, entry $entry, $nload PT_LOAD segments ($(human "$VMLINUX"))"
	else
		echo "$VMLINUX: ($(human "$VMLINUX"))"
	fi
	echo "$INITRAMFS: gzip'd newc cpio, busybox-static + virtio modules + /init ($(human "$INITRAMFS"))"
	echo "kernel version: $rel"
}

if [ "$have_all" = 1 ]; then
	say "$OUTDIR is complete, nothing to do (remove it to fetch again):"
	report
	exit 0
fi

# ---------------------------------------------------------------- step 1: tools

if [ "$(id -u)" -eq 0 ]; then SUDO=
elif command -v sudo >/dev/null 2>&1; then SUDO=sudo
else SUDO=NONE; fi

as_root() {
	[ "$SUDO" != NONE ] || die "need root (or sudo) to run: $*"
	$SUDO "$@"
}

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
	die "apt-get and dpkg-deb are required (this script targets Debian 12)"
fi

apt_updated=0
apt_update() {
	[ "$apt_updated" = 1 ] && return 0
	say "apt-get update"
	as_root apt-get update -q || die "apt-get update failed (network? sources.list?)"
	apt_updated=1
}

# "command:package" pairs; a package is installed when its command is missing
missing=
for pair in lz4:lz4 cpio:cpio gzip:gzip readelf:binutils od:coreutils; do
	cmd=${pair%%:*} pkg=${pair#*:}
	command -v "$cmd" >/dev/null 2>&1 || missing="$missing $pkg"
done
# the static busybox specifically (the dynamic "busybox" package will not do in an initramfs)
dpkg -s busybox-static >/dev/null 2>&1 || missing="$missing busybox-static"

if [ -n "$missing" ]; then
	say "installing:$missing"
	apt_update
	# shellcheck disable=SC2086
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing ||
		die "apt-get install$missing failed"
fi

BUSYBOX=
for b in /bin/busybox /usr/bin/busybox $(dpkg -L busybox-static 2>/dev/null | grep '/busybox$' || true); do
	if [ -x "$b" ]; then BUSYBOX=$b; break; fi
done
[ -n "$BUSYBOX" ] || die "busybox-static is installed but no busybox binary was found"
if readelf -lW "$BUSYBOX" | grep -q 'INTERP'; then
	die "$BUSYBOX is dynamically linked; install busybox-static (it replaces busybox)"
fi

mkdir -p "$OUTDIR"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/luakvm-kernel.XXXXXX")

# ---------------------------------------------------------------- step 2: bzImage

if [ -s "$BZIMAGE" ] && [ -d "$MODULES" ]; then
	say "keeping existing $BZIMAGE and $MODULES"
elif [ -s "$BZIMAGE" ]; then
	# the modules of exactly this kernel (their vermagic must match): its versioned package
	rel=$(bz_release "$BZIMAGE")
	[ -n "$rel" ] || die "$BZIMAGE names no kernel release; remove it to fetch again"
	mkdir "$TMP/deb"
	if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then
		chmod 0755 "$TMP"
		chown _apt "$TMP/deb" || true
	fi
	say "apt-get download linux-image-$rel (for its modules)"
	(cd "$TMP/deb" && apt-get download -q "linux-image-$rel") ||
		die "apt-get download linux-image-$rel failed (remove $BZIMAGE to fetch the current kernel)"
	deb=$(first "$TMP"/deb/linux-image-"$rel"_*.deb)
	[ -n "$deb" ] || die "apt-get download left no linux-image-$rel .deb"
	dpkg-deb -x "$deb" "$TMP/root" || die "dpkg-deb -x $deb failed"
else
	arch=$(dpkg --print-architecture)
	[ "$arch" = amd64 ] || die "host architecture is $arch; $META_PKG needs an amd64 Debian"

	if ! apt-cache show "$META_PKG" >/dev/null 2>&1; then apt_update; fi
	apt-cache show "$META_PKG" >/dev/null 2>&1 ||
		die "package $META_PKG unknown to apt (is deb.debian.org bookworm main in sources.list?)"

	mkdir "$TMP/deb"
	# let apt fetch as its sandbox user _apt (otherwise it warns it downloads "unsandboxed as root")
	if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then
		chmod 0755 "$TMP"
		chown _apt "$TMP/deb" || true
	fi
	say "apt-get download $META_PKG"
	(cd "$TMP/deb" && apt-get download -q "$META_PKG") || die "apt-get download $META_PKG failed"
	meta=$(first "$TMP"/deb/"$META_PKG"_*.deb)
	[ -n "$meta" ] || die "apt-get download left no $META_PKG .deb"

	deps=$(dpkg-deb -f "$meta" Depends)
	# "linux-image-6.1.0-NN-cloud-amd64 (= 6.1.x-y)"; take the first versioned image package
	dep=$(printf '%s\n' "$deps" | sed 's/[,|]/\n/g' | grep -E '^ *linux-image-[0-9]' | head -n 1)
	pkg=$(printf '%s\n' "$dep" | sed -E 's/^ *([^ (]+).*/\1/')
	ver=$(printf '%s\n' "$dep" | sed -nE 's/.*\(= *([^)]+)\).*/\1/p')
	[ -n "$pkg" ] || die "cannot find a linux-image-<version> package in Depends: $deps"
	spec=$pkg${ver:+=$ver}

	say "apt-get download $spec"
	(cd "$TMP/deb" && apt-get download -q "$spec") || die "apt-get download $spec failed"
	deb=$(first "$TMP"/deb/"$pkg"_*.deb)
	[ -n "$deb" ] || die "apt-get download left no $pkg .deb"

	dpkg-deb -x "$deb" "$TMP/root" || die "dpkg-deb -x $deb failed"
	vmlinuz=$(first "$TMP"/root/boot/vmlinuz-*)
	[ -n "$vmlinuz" ] || die "$deb has no /boot/vmlinuz-*"
	cp "$vmlinuz" "$BZIMAGE.tmp" && mv "$BZIMAGE.tmp" "$BZIMAGE"
	say "$BZIMAGE <- ${vmlinuz##*/} from ${deb##*/}"
fi

# the virtio modules out of the package just unpacked, uncompressed
if [ -d "$TMP/root" ]; then
	rm -rf "$MODULES.tmp"
	mkdir -p "$MODULES.tmp"
	for m in $VIRTIO_MODULES; do
		ko=$(find "$TMP/root/lib/modules" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n 1)
		[ -n "$ko" ] || die "${deb##*/} has no $m module"
		case $ko in
		*.xz)  xz -dc "$ko" >"$MODULES.tmp/$m.ko" || die "xz -d $ko failed" ;;
		*.zst) zstd -dc "$ko" >"$MODULES.tmp/$m.ko" || die "zstd -d $ko failed" ;;
		*.gz)  gzip -dc "$ko" >"$MODULES.tmp/$m.ko" || die "gzip -d $ko failed" ;;
		*)     cp "$ko" "$MODULES.tmp/$m.ko" ;;
		esac
	done
	rm -rf "$MODULES"
	mv "$MODULES.tmp" "$MODULES"
	say "$MODULES <- $VIRTIO_MODULES"
	rm -f "$INITRAMFS"             # built again with them
	rm -rf "$TMP/root" "$TMP/deb"
fi

[ "$(bytes "$BZIMAGE" $((0x202)) 4)" = 48647253 ] || die "$BZIMAGE has no 'HdrS' setup header"
[ "$(bytes "$BZIMAGE" $((0x1fe)) 2)" = 55aa ] || die "$BZIMAGE has no 0xAA55 boot flag"

# ---------------------------------------------------------------- step 3: vmlinux

if [ -s "$VMLINUX" ] && is_elf_x86_64 "$VMLINUX"; then
	say "keeping existing $VMLINUX"
else
	# The compressed kernel sits at payload_offset (0x248) from the start of the protected-mode
	# code, which begins after (setup_sects + 1) sectors; payload_length is at 0x24c.
	sects=$(le "$BZIMAGE" $((0x1f1)) 1)
	[ "$sects" -ne 0 ] || sects=4
	pm=$(( (sects + 1) * 512 ))
	poff=$(( pm + $(le "$BZIMAGE" $((0x248)) 4) ))
	plen=$(le "$BZIMAGE" $((0x24c)) 4)
	offsets=
	if [ "$(bytes "$BZIMAGE" "$poff" 4)" = 02214c18 ]; then
		offsets=$poff
	else
		# not where the header says (or not LZ4 there): scan the file for the magic instead
		offsets=$(grep -obUaP "$LZ4_MAGIC" "$BZIMAGE" | cut -d: -f1 || true)
		plen=
		[ -n "$offsets" ] || die "no LZ4 legacy frame (02 21 4c 18) in $BZIMAGE; is it LZ4-compressed?"
	fi

	ok=0
	for off in $offsets; do
		say "decompressing LZ4 payload at offset $off${plen:+ (length $plen)}"
		# lz4 may exit non-zero on the bytes after the frame (the kernel appends the 4-byte
		# decompressed size, and a scan may start inside other data): judge the output instead.
		if [ -n "$plen" ]; then
			tail -c +$(( off + 1 )) "$BZIMAGE" | head -c "$plen" | lz4 -dc >"$VMLINUX.tmp" 2>"$TMP/lz4.err" || true
		else
			tail -c +$(( off + 1 )) "$BZIMAGE" | lz4 -dc >"$VMLINUX.tmp" 2>"$TMP/lz4.err" || true
		fi
		if is_elf_x86_64 "$VMLINUX.tmp"; then ok=1; break; fi
	done
	if [ "$ok" != 1 ]; then
		rm -f "$VMLINUX.tmp"
		die "LZ4 decompression gave no x86-64 ELF (lz4 said: $(head -c 300 "$TMP/lz4.err"))"
	fi
	mv "$VMLINUX.tmp" "$VMLINUX"
	say "$VMLINUX extracted"
fi

# ---------------------------------------------------------------- step 4: initramfs

if [ -s "$INITRAMFS" ]; then
	say "keeping existing $INITRAMFS"
else
	R=$TMP/initramfs
	mkdir -p "$R/bin" "$R/dev" "$R/proc" "$R/sys" "$R/tmp" "$R/root" "$R/etc" "$R/lib/modules" "$R/mnt"
	for m in $VIRTIO_MODULES; do cp "$MODULES/$m.ko" "$R/lib/modules/$m.ko"; done
	cp "$BUSYBOX" "$R/bin/busybox"
	chmod 0755 "$R/bin/busybox"
	# every applet as a relative symlink, like "busybox --install -s" but into the image
	for a in $("$BUSYBOX" --list); do
		[ "$a" = busybox ] || [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"
	done
	for a in sh mount umount echo cat ls uname poweroff reboot init setsid cttyhack insmod sync sleep switch_root; do
		[ -e "$R/bin/$a" ] || die "busybox has no '$a' applet"
	done
	if [ "$(id -u)" -eq 0 ]; then
		mknod -m 0600 "$R/dev/console" c 5 1
		mknod -m 0666 "$R/dev/null" c 1 3
	fi
	chmod 1777 "$R/tmp"
	chmod 0700 "$R/root"

	cat >"$R/init" <<'EOF'
#!/bin/sh
# luakvm test initramfs
export PATH=/bin HOME=/root TERM=${TERM:-linux}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
# without a /dev/console in the image the kernel gave us no stdio: reopen it from devtmpfs
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
# the virtio drivers (the VMM's disks, entropy, consoles), in dependency order;
# quietly: a kernel booted with nomodules, or without virtio devices, goes on
for m in virtio_ring virtio virtio_mmio virtio_blk virtio-rng virtio_console; do
	insmod /lib/modules/$m.ko 2>/dev/null
done
echo LUAKVM-INIT-OK
uname -r
# root=DEVICE: mount it and switch_root to its init, as a distribution's
# initramfs does (the kernel reads root= only when there is no initramfs)
root= fstype= flags= mode=ro newinit=
for a in $(cat /proc/cmdline); do
	case $a in
	root=*) root=${a#root=} ;;
	rootfstype=*) fstype=${a#rootfstype=} ;;
	rootflags=*) flags=${a#rootflags=} ;;
	ro|rw) mode=$a ;;
	init=*) newinit=${a#init=} ;;
	esac
done
if [ -n "$root" ]; then
	# the disk appears once its driver has probed it: wait up to 10 s
	n=0
	while [ ! -b "$root" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
	if mount ${fstype:+-t "$fstype"} -o "$mode${flags:+,$flags}" "$root" /mnt; then
		[ -n "$newinit" ] || for i in /sbin/init /bin/sh; do
			if [ -x "/mnt$i" ] || [ -L "/mnt$i" ]; then newinit=$i; break; fi
		done
		if [ -n "$newinit" ]; then
			echo "LUAKVM-ROOT $root ($mode): switch_root to $newinit"
			mount --move /dev /mnt/dev 2>/dev/null || umount -l /dev
			umount /proc /sys
			exec switch_root /mnt "$newinit"
		fi
		echo "LUAKVM-ROOT $root has no /sbin/init nor /bin/sh: staying in the initramfs"
		umount /mnt
	else
		echo "LUAKVM-ROOT cannot mount $root: staying in the initramfs"
	fi
fi
# busybox init as PID 1 (/etc/inittab): a shell on the console, started again
# when it exits; poweroff, reboot and halt signal it and it ends the system
exec /bin/init
EOF
	cat >"$R/etc/inittab" <<'EOF'
::respawn:/bin/cttyhack /bin/sh
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sync
EOF
	chmod 0755 "$R/init"

	(cd "$R" && find . | sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9 -n >"$INITRAMFS.tmp" ||
		die "packing $INITRAMFS failed"
	mv "$INITRAMFS.tmp" "$INITRAMFS"
	echo "$INITRAMFS_VERSION" >"$INITRAMFS_STAMP"
	say "$INITRAMFS built"
fi

# ---------------------------------------------------------------- step 5: report

report
