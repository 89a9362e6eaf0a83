#!/bin/sh
# /init of tools/nested.sh's first-level guest (busybox): load kvm_amd and 9p,
# put the host's / (read-only) and the checkout (read-write) together under
# /host, chroot there and run /run/cmd on ttyS1; its exit status goes to
# /run/rc (the host's run folder), then power off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

fail() { echo "nested-init: $*"; echo "nested-init: $*" >/dev/ttyS1; sync; poweroff -f; }

for m in $(cat /lib/modules/order); do
	[ "$m" = kvm-amd ] && break
	insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done
msize=262144
for w in $(cat /proc/cmdline); do case $w in luakvm.msize=*) msize=${w#*=} ;; esac; done
o=trans=virtio,version=9p2000.L,msize=$msize
mount -t 9p -o "$o" run /run || fail "cannot mount the run folder"
# shellcheck disable=SC2046
insmod /lib/modules/kvm-amd.ko $(cat /run/kvm_amd_options) || fail "insmod kvm-amd failed"
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm-amd (does the CPU offer SVM?)"
mount -t 9p -o "$o,ro" hostroot /host || fail "cannot mount the host's /"
checkout=$(cat /run/checkout)
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
mount -t tmpfs tmpfs /host/run
mkdir -p /host/run/luakvm
mount --bind /run /host/run/luakvm
# the checkout last: it may lie under /tmp or /run, which are the guest's own now
mkdir -p "/host$checkout" 2>/dev/null
mount -t 9p -o "$o" checkout "/host$checkout" || fail "cannot mount the checkout at $checkout"
echo "nested-init: clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"

if [ "$(cat /run/interactive)" = 1 ]; then
	stty -F /dev/ttyS1 sane
else
	stty -F /dev/ttyS1 raw -echo
fi
# a heartbeat on the console (nested.sh's log), by which the host tells a guest
# that froze from a command that is quiet
(while sleep 20; do echo "nested-init: up $(cut -d' ' -f1 /proc/uptime) s"; done) &
beat=$!
# a session of its own with ttyS1 as its controlling terminal (^C reaches it);
# the host's setsid, which can wait
chroot /host /usr/bin/setsid -w -c /bin/sh /run/luakvm/cmd <>/dev/ttyS1 >&0 2>&1
echo $? >/run/rc
kill "$beat"
sync
umount /host/run/luakvm /host"$checkout" /run 2>/dev/null
poweroff -f
