--- disk.lua: rows 7 and 8 of `make bench`, reading a disk inside the guest:
-- luakvm's virtio-blk beside QEMU's (`-M microvm -accel kvm`, virtio-blk-device
-- on its virtio-mmio), the same kernel, command line, 128 MiB and read-only
-- raw image (DISK_MIB MiB of random bytes in $TMPDIR), booted with the
-- bench's initramfs: `make kernel`'s (busybox, the virtio modules) with a
-- second archive appended whose /init, instead of a shell, runs
--
--   7. `dd if=/dev/vda of=/dev/null bs=1M`: the whole disk, sequentially,
--      through the guest's page cache.
--   8. bench/randread (static, in the archive): RANDREADS reads of 4 KiB at
--      random 4 KiB-aligned offsets, O_DIRECT, one at a time.
--
-- Each is timed here, on the host, from the console line /init prints just
-- before it to the one just after (a line costs well under a millisecond;
-- the guests' clocks agree with it to a few percent: dd's /proc/uptime and
-- randread's own time are in the logs). Before and after
-- each phase /init prints the guest's /sys/block/vda/stat (the requests the
-- guest completed) and sleeps a second; luakvm's VMM (bench/diskvm.lua)
-- prints its counters (exits, notifies, chains, interrupts, time in the
-- device and in preadv) as each such line arrives, so each phase's
-- exits per request are differences of the two.
--
-- Used by bench/bench.lua (`local disk = dofile "bench/disk.lua"`); runs from
-- the top of the tree.
local kvm = require "kvm"
local linux = require "kvm.linux"
local hostprofile = require "kvm.hostprofile"

local disk = {}

disk.MEMORY_MIB = 128
disk.MIB = tonumber(os.getenv("DISK_MIB") or "256")
disk.RANDREADS = tonumber(os.getenv("RANDREADS") or "1000")
disk.VMLINUX = os.getenv("VMLINUX") or "guest-kernel/vmlinux"
disk.INITRD = os.getenv("INITRD") or "guest-kernel/initramfs.cpio.gz"
disk.MODULES = "guest-kernel/modules"
disk.TIMEOUT = tonumber(os.getenv("DISK_TIMEOUT") or os.getenv("BOOT_TIMEOUT") or "600")
disk.OUT = "bench/out"
disk.RANDREAD = "bench/randread"

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  if not ok then error(cmd .. " failed: " .. out, 2) end
  return out
end

-- the bench's /init: the test initramfs's set-up, then the two phases
local INIT = [[#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
for m in virtio_ring virtio virtio_mmio virtio_blk; do insmod /lib/modules/$m.ko; done
phase() { echo "LUAKVM-DISK $1 $(cat /sys/block/vda/stat)"; sleep 1; }
if [ -b /dev/vda ]; then
	echo "LUAKVM-FLAGS $(grep -m1 '^flags' /proc/cpuinfo)"
	phase start
	t0=$(cut -d' ' -f1 /proc/uptime)
	echo LUAKVM-T seq0
	dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null
	echo LUAKVM-T seq1
	echo "LUAKVM-SEQ $t0 $(cut -d' ' -f1 /proc/uptime)"
	phase seq
	echo LUAKVM-T rand0
	/bin/randread /dev/vda RANDREADS >/tmp/rr
	echo LUAKVM-T rand1
	sed 's/^/LUAKVM-/' /tmp/rr
	phase rand
else
	echo "LUAKVM-DISK-FAIL no /dev/vda"
fi
echo LUAKVM-DISK-DONE
poweroff -f
]]

--- Make the image and the initramfs in dir (once per bench run).
-- @treturn table {image =, initrd =}
function disk.prepare(dir)
  local image, initrd = dir .. "/disk.img", dir .. "/initrd.cpio.gz"
  sh(("head -c %dM /dev/urandom > %s"):format(disk.MIB, q(image)))
  local root = dir .. "/root"
  sh(("mkdir -p %s/bin && cp %s %s/bin/randread"):format(q(root), q(disk.RANDREAD), q(root)))
  local f = assert(io.open(root .. "/init", "w"))
  f:write((INIT:gsub("RANDREADS", tostring(disk.RANDREADS))))
  f:close()
  -- a second archive after make kernel's: the kernel unpacks both, the later /init wins
  sh(("chmod 0755 %s/init && (cd %s && printf 'init\\nbin\\nbin/randread\\n' | cpio -o -H newc -R 0:0 --quiet"
    .. " | gzip -n) > %s/extra.cpio.gz && cat %s %s/extra.cpio.gz > %s")
    :format(q(root), q(root), q(dir), q(disk.INITRD), q(dir), q(initrd)))
  return { image = image, initrd = initrd }
end

--- The command line both are given (nomodules left out: the virtio drivers
-- are modules).
function disk.cmdline(files)
  return linux.cmdline({ disks = { files.image } }, hostprofile.detect())
end

--- The two commands, as shell words.
function disk.commands(files)
  return {
    ours = ("lua5.4 bench/diskvm.lua %s %s %s %d %d"):format(q(disk.VMLINUX), q(files.initrd),
      q(files.image), disk.MEMORY_MIB, disk.TIMEOUT),
    qemu = ("qemu-system-x86_64 -M microvm -accel kvm -cpu host,-arch-capabilities,-cx16 -m %dM "
      .. "-nodefaults -no-user-config -nographic -serial stdio -kernel %s -initrd %s -append %s "
      .. "-drive id=vda,file=%s,format=raw,if=none,readonly=on -device virtio-blk-device,drive=vda")
      :format(disk.MEMORY_MIB, q(disk.VMLINUX), q(files.initrd), q(disk.cmdline(files)), q(files.image)),
  }
end

-- "k=v k=v" into a table of numbers
local function fields(s)
  local t = {}
  for k, v in s:gmatch("(%S+)=(%d+)") do t[k] = tonumber(v) end
  return t
end

--- One boot: spawn `cmd`, read its console to LUAKVM-DISK-DONE, kill it.
-- The console goes to bench/out/disk-NAME.log.
-- @treturn table {seq = dd's seconds, rand = randread's (host clock),
--   guest_seq, guest_rand = the same by the guest's clock, guest =
--   {phase = {/sys/block/vda/stat fields}}, host = {phase = {counters}}
--   (luakvm only), stopped = why, when DONE never came, last = line}
function disk.once(name, cmd)
  os.execute("mkdir -p " .. disk.OUT)
  local log = assert(io.open(("%s/disk-%s.log"):format(disk.OUT, name), "w"))
  log:setvbuf("line")
  local shcmd = ("exec 2>%s/disk-%s.err </dev/null; echo $$; exec timeout -s KILL %d %s")
    :format(disk.OUT, name, disk.TIMEOUT + 30, cmd)
  local t0 = kvm.now()
  local p = assert(io.popen(shcmd, "r"))
  local tpid = p:read("l")
  local r = { guest = {}, host = {}, last = "" }
  local marks = {}
  for line in p:lines() do
    local t = kvm.now() - t0
    line = line:gsub("\r", "")
    log:write(("%9.3f %s\n"):format(t, line))
    local mark = line:match("^LUAKVM%-T (%w+)")
    if mark then marks[mark] = t end
    if line ~= "" then r.last = line end
    local phase, st = line:match("^LUAKVM%-DISK (%S+) (.*)")
    if phase then
      local f = {}
      for n in st:gmatch("%d+") do f[#f + 1] = tonumber(n) end
      r.guest[phase] = f
    end
    local hphase, kv = line:match("^LUAKVM%-HOST (%S+) (.*)")
    if hphase then r.host[hphase] = fields(kv) end
    local u0, u1 = line:match("^LUAKVM%-SEQ ([%d.]+) ([%d.]+)")
    if u0 then r.guest_seq = tonumber(u1) - tonumber(u0) end
    r.guest_rand = r.guest_rand or tonumber(line:match("^LUAKVM%-randread %d+ %d+ ([%d.]+)"))
    if line:find("LUAKVM-DISK-DONE", 1, true) then r.done = true; break end
  end
  -- the VMM (timeout(1)'s only child), if /init's poweroff has not ended it yet
  local f = io.open(("/proc/%s/task/%s/children"):format(tpid, tpid))
  local pid = f and f:read("a"):match("%d+")
  if f then f:close() end
  if pid then os.execute(("kill -KILL %s 2>/dev/null"):format(pid)) end
  local _, how, code = p:close()
  if marks.seq0 and marks.seq1 then r.seq = marks.seq1 - marks.seq0 end
  if marks.rand0 and marks.rand1 then r.rand = marks.rand1 - marks.rand0 end
  if not r.done then r.stopped = ("%s %s after %.0f s"):format(how, code, kvm.now() - t0) end
  log:close()
  return r
end

--- `rounds` boots each, interleaved ours/QEMU.
-- @treturn table {ours = {...}, qemu = {...}} of disk.once results, and
--   `cmdline`
function disk.measure(rounds, progress)
  local dir = sh("mktemp -d"):match("^(%S+)")
  progress(("disk: %d MiB image and initramfs in %s"):format(disk.MIB, dir))
  local files = disk.prepare(dir)
  local cmds = disk.commands(files)
  local res = { ours = {}, qemu = {}, cmdline = disk.cmdline(files) }
  for r = 1, rounds do
    for _, who in ipairs{ "ours", "qemu" } do
      progress(("disk %d/%d: %s"):format(r, rounds, who))
      res[who][r] = disk.once(("%s-%d"):format(who, r), cmds[who])
    end
  end
  os.execute("rm -rf " .. q(dir))
  return res
end

return disk
