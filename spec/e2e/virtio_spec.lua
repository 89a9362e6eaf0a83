-- End-to-end: Debian's cloud kernel with virtio-mmio devices described in the
-- DSDT (kvm.acpi), driven by the virtio modules the initramfs loads (`make
-- kernel`). A disk image made from a folder without root (mke2fs -d) is
-- mounted, read and written in the guest; the host then finds the guest's
-- file in it (debugfs). Read-only, the guest cannot change a byte of it. The
-- entropy device becomes the guest's hw_random source. Devices written in Lua
-- (vm:virtio): examples/cow_disk.lua's disk over a read-only image, an
-- entropy device.
-- Tagged e2e and userspace: run nested on a kvm_pvm host (tools/test.sh).
local support = require "support"
local linux = require "kvm.linux"

local DIR = os.getenv("LUAKVM_KERNEL_DIR") or "guest-kernel"

local exists = support.exists

local tmp = {}
teardown(function() for _, p in ipairs(tmp) do os.execute("rm -rf '" .. p .. "'") end end)

-- an ext4 image (8 MiB, or `mib`) holding /marker.txt, made without root
local function ext4_image(marker, mib)
  local dir = support.sh("mktemp -d"):match("^(%S+)")
  tmp[#tmp + 1] = dir
  local f = assert(io.open(dir .. "/marker.txt", "w"))
  f:write(marker, "\n")
  f:close()
  local img = os.tmpname()
  tmp[#tmp + 1] = img
  local out, code = support.sh(("PATH=$PATH:/sbin:/usr/sbin mke2fs -q -F -t ext4 -d '%s' '%s' %dM"):format(dir, img,
    mib or 8))
  assert.equal(0, code, out)
  return img
end

-- the image's allocated 512-byte blocks (stat %b)
local function blocks(path)
  return tonumber(support.sh("stat -c %b '" .. path .. "'"):match("%d+"))
end

local function md5(path)
  return (support.sh("md5sum '" .. path .. "'"):match("^(%x+)"))
end

-- Boot with `setup` options; type each step's `send` once the console has
-- shown the previous step's `wait` (the first: once /init says it is up),
-- then poweroff. Returns the exit, the console log and the VM's counters.
local function boot(setup, steps)
  local typist = support.typist(steps)
  local go = typist.go
  local waits = { "LUAKVM-INIT-OK" }
  for i, s in ipairs(steps) do waits[i + 1] = s.wait end
  local stage, seen, log = 1, "", {}
  local function output(bytes)
    io.stderr:write(bytes)
    log[#log + 1] = bytes
    seen = (seen .. bytes):sub(-8192)
    if stage <= #steps and seen:find(waits[stage], 1, true) then
      go(stage)
      stage = stage + 1
      seen = ""
    end
  end
  local opts = { kernel = DIR .. "/vmlinux", initrd = DIR .. "/initramfs.cpio.gz",
                 memory = 128 << 20, output = output, input = typist.pipe }
  for k, v in pairs(setup) do opts[k] = v end
  local ctx, err = linux.setup(opts)
  assert(ctx, err)
  local e = linux.run(ctx, { timeout = 240 })
  local stats = ctx.vm:stats()
  ctx.vm:close()
  typist.close()
  local all = table.concat(log)
  assert.is_true(stage > #steps, ("the guest never printed %q; the run ended with %s")
    :format(waits[math.min(stage, #waits)], tostring(e)))
  return e, all, stats
end

local function need_kernel()
  support.need_kvm()
  if not exists(DIR .. "/vmlinux") or not exists(DIR .. "/initramfs.cpio.gz") or not exists(DIR .. "/modules") then
    return pending("no kernel, initramfs or modules in " .. DIR .. ": run make kernel")
  end
end

describe("#e2e #userspace virtio-mmio devices in Linux", function()
  it("a disk the guest mounts, reads and writes, synced before poweroff; entropy from virtio-rng; " ..
     "a virtio console", function()
    need_kernel()
    local img = ext4_image("marker-from-the-host")
    local hvc = ""
    local e, log, stats = boot({ disks = { img }, rng = true,
                                 virtio_console = { output = function(b) hvc = hvc .. b end } }, {
      { send = "echo luakvm-$((6*7))\n", wait = "luakvm-42" },
      { send = "mount -t ext4 /dev/vda /mnt && cat /mnt/marker.txt && echo written-in-the-guest > /mnt/newfile"
          .. " && sync && umount /mnt && echo disk-$((4+4))-ok\n", wait = "disk-8-ok" },
      { send = "cat /sys/devices/virtual/misc/hw_random/rng_current; head -c 64 /dev/hwrng | wc -c\n",
        wait = "\n64" },
      { send = "echo through-hvc0-$((3+4)) > /dev/hvc0; echo hvc-$((2*5))-ok\n", wait = "hvc-10-ok" },
      { send = "poweroff\n", wait = "reboot: Power down" },
    })
    assert.equal("poweroff", e.reason, tostring(e))
    assert.truthy(log:find("[vda] 16384 512-byte logical blocks", 1, true), "no vda in the kernel's log")
    assert.truthy(log:find("marker-from-the-host", 1, true))
    assert.truthy(log:find("virtio_rng.0", 1, true), "rng_current does not name virtio_rng.0")
    local out, code = support.sh(("PATH=$PATH:/sbin:/usr/sbin debugfs -R 'cat /newfile' '%s'"):format(img))
    assert.equal(0, code, out)
    assert.truthy(out:find("written-in-the-guest", 1, true), out)
    assert.is_true(stats.blk_writes > 0 and stats.blk_flushes > 0 and stats.rng_bytes >= 64)
    assert.equal(0, stats.virtio_errors)
    assert.truthy(hvc:find("through-hvc0-7", 1, true), "the virtio console said: " .. hvc)
  end)

  it("a read-only disk: the guest mounts and reads it, its writes fail, the image is unchanged", function()
    need_kernel()
    local img = ext4_image("read-only-marker")
    local before = md5(img)
    local e, log, stats = boot({ disks = { { path = img, readonly = true } } }, {
      { send = "echo luakvm-$((6*7))\n", wait = "luakvm-42" },
      { send = "mount -t ext4 /dev/vda /mnt; cat /mnt/marker.txt; echo x > /mnt/newfile || echo write-$((2+2))-failed\n",
        wait = "write-4-failed" },
      { send = "umount /mnt; dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync; sync; echo dd-$((5+5))-done\n",
        wait = "dd-10-done" },
      { send = "poweroff\n", wait = "reboot: Power down" },
    })
    assert.equal("poweroff", e.reason, tostring(e))
    assert.truthy(log:find("read-only-marker", 1, true))
    assert.equal(before, md5(img))
    assert.equal(0, stats.blk_writes)
    assert.equal(0, stats.virtio_errors)
  end)

  it("devices written in Lua (vm:virtio): examples/cow_disk.lua's copy-on-write disk, mounted, read and " ..
     "written: the writes stay in its table, traced, the image unchanged; an entropy device", function()
    need_kernel()
    local cow = dofile("examples/cow_disk.lua")
    local img = ext4_image("cow-marker-from-the-host")
    local before = md5(img)
    local trace = {}
    local disk = assert(cow.new(img, { trace = function(op, sector, n) trace[#trace + 1] = { op, sector, n } end }))
    local urandom = assert(io.open("/dev/urandom", "rb"))
    local rng_bytes = 0
    local entropy = { type = "entropy", on_queue = function(q)
      for c in q:chains() do
        local n = math.min(c.writable, 64)
        rng_bytes = rng_bytes + n
        c:done(c:write(0, urandom:read(n)))
      end
    end }
    local e, log, stats = boot({ virtio = { disk.options, entropy } }, {
      { send = "echo luakvm-$((6*7))\n", wait = "luakvm-42" },
      { send = "mount -t ext4 /dev/vda /mnt && cat /mnt/marker.txt && echo written-in-the-$((2+3))-guest > /mnt/newfile"
          .. " && sync && umount /mnt && mount -t ext4 /dev/vda /mnt && cat /mnt/newfile && umount /mnt"
          .. " && echo cow-$((4+4))-ok\n", wait = "cow-8-ok" },
      { send = "cat /sys/devices/virtual/misc/hw_random/rng_current; head -c 64 /dev/hwrng | wc -c\n",
        wait = "\n64" },
      { send = "poweroff\n", wait = "reboot: Power down" },
    })
    urandom:close()
    assert.equal("poweroff", e.reason, tostring(e))
    assert.truthy(log:find("[vda] 16384 512-byte logical blocks", 1, true), "no vda in the kernel's log")
    assert.truthy(log:find("cow-marker-from-the-host", 1, true))
    assert.truthy(log:find("written-in-the-5-guest", 1, true), "the guest did not read its file back")
    assert.truthy(log:find("virtio_rng.0", 1, true), "rng_current does not name virtio_rng.0")
    assert.is_true(rng_bytes >= 64)
    -- the image: not a byte changed; the guest's writes: in the table, every sector of them traced
    assert.equal(before, md5(img))
    local c = disk.counts
    assert.is_true(c.reads > 0 and c.writes > 0 and c.flushes > 0, "counts: " .. c.reads .. " " .. c.writes)
    assert.same({ 0, 0 }, { c.errors, c.bad })
    local traced = {}
    for _, t in ipairs(trace) do
      if t[1] == "W" then for s = t[2], t[2] + t[3] - 1 do traced[s] = true end end
    end
    local n = 0
    for s in pairs(disk.overlay) do
      assert.is_true(traced[s], "sector " .. s .. " written but not traced")
      n = n + 1
    end
    assert.is_true(n > 0)
    for s in pairs(traced) do assert.is_not_nil(disk.overlay[s], "sector " .. s .. " traced but not in the table") end
    -- the image and the table together hold the guest's file; the image alone does not
    local merged = os.tmpname()
    tmp[#tmp + 1] = merged
    assert.is_true(disk.save(merged))
    disk.close()
    local debugfs = "PATH=$PATH:/sbin:/usr/sbin debugfs -R 'cat /newfile' '%s' 2>&1"
    local out = support.sh(debugfs:format(merged))
    assert.truthy(out:find("written-in-the-5-guest", 1, true), out)
    out = support.sh(debugfs:format(img))
    assert.falsy(out:find("written-in-the-5-guest", 1, true), out)
    assert.equal(0, stats.virtio_errors)
    assert.is_true(stats.virtio_lua_used > 0)
  end)

  it("fstrim in the guest: DISCARD punches the deleted file's blocks out of the image", function()
    need_kernel()
    local img = ext4_image("trim-marker", 32)
    if not support.punches_holes(img) then
      return pending("the file system of " .. img .. " punches no holes: DISCARD is not offered")
    end
    local before = blocks(img)
    local e, log, stats = boot({ disks = { img } }, {
      { send = "echo luakvm-$((6*7))\n", wait = "luakvm-42" },
      { send = "cat /sys/block/vda/queue/discard_max_bytes; mount -t ext4 /dev/vda /mnt"
          .. " && dd if=/dev/urandom of=/mnt/big bs=1M count=8 && sync && rm /mnt/big && sync"
          .. " && fstrim -v /mnt && umount /mnt && echo trim-$((3+3))-ok\n", wait = "trim-6-ok" },
      { send = "poweroff\n", wait = "reboot: Power down" },
    })
    assert.equal("poweroff", e.reason, tostring(e))
    assert.truthy(log:find("\n2147483648\r?\n"), "discard_max_bytes is not max_discard_sectors' 2 GiB")
    assert.is_true(stats.blk_discards > 0, "no DISCARD request")
    assert.equal(0, stats.virtio_errors)
    -- 8 MiB were written and deleted: without the holes the image would hold them
    local grown = (blocks(img) - before) * 512
    assert.is_true(grown < 4 << 20, ("the image grew by %d bytes"):format(grown))
    local out, code = support.sh(("PATH=$PATH:/sbin:/usr/sbin e2fsck -fn '%s'"):format(img))
    assert.equal(0, code, out)
  end)

  it("root=/dev/vda: the initramfs's /init mounts the disk and switch_root's to its /sbin/init", function()
    need_kernel()
    -- a root file system: static busybox, /bin/sh, an /sbin/init that reports and powers off
    local dir = support.sh("mktemp -d"):match("^(%S+)")
    tmp[#tmp + 1] = dir
    local out, code = support.sh(("cd '%s' && mkdir bin sbin proc dev && cp /bin/busybox bin/ && ln -s busybox bin/sh"
      .. " && echo root-marker > marker"):format(dir))
    assert.equal(0, code, out)
    local f = assert(io.open(dir .. "/sbin/init", "w"))
    f:write([[#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "LUAKVM-NEWROOT $(/bin/busybox cat /marker) pid $$ $(/bin/busybox grep ' / ' /proc/mounts)"
/bin/busybox poweroff -f
]])
    f:close()
    assert.equal(0, select(2, support.sh(("chmod 0755 '%s/sbin/init'"):format(dir))))
    local img = os.tmpname()
    tmp[#tmp + 1] = img
    out, code = support.sh(("PATH=$PATH:/sbin:/usr/sbin mke2fs -q -F -t ext4 -d '%s' '%s' 8M"):format(dir, img))
    assert.equal(0, code, out)
    local e, log = boot({ disks = { img }, append = "root=/dev/vda" }, {
      { send = "", wait = "LUAKVM-NEWROOT" },
    })
    assert.equal("poweroff", e.reason, tostring(e))
    assert.truthy(log:find("LUAKVM-ROOT /dev/vda (ro): switch_root to /sbin/init", 1, true), log:sub(-2000))
    assert.truthy(log:find("LUAKVM-NEWROOT root-marker pid 1 /dev/vda / ext4 ro", 1, true), log:sub(-2000))
  end)
end)
