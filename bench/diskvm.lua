#!/usr/bin/env lua5.4
--- diskvm.lua: luakvm's side of the disk rows (bench/disk.lua): boot Linux
-- with IMAGE as a read-only virtio-blk disk and the bench's initramfs, its
-- console on stdout. When the guest prints a phase line ("LUAKVM-DISK
-- NAME ..."; it then sleeps a second before the next phase), the VM's
-- counters at that moment follow on stdout as one line "LUAKVM-HOST NAME
-- key=value ...": the exits (all, and exit_REASON for each reason), the
-- virtio-blk device's counters, so the
-- bench can take each phase's difference.
--
-- Usage (from the top of the tree): lua5.4 bench/diskvm.lua VMLINUX INITRD IMAGE MEMORY_MIB TIMEOUT
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath
local linux = require "kvm.linux"

local vmlinux, initrd, image, mib, timeout = arg[1], arg[2], arg[3], tonumber(arg[4]), tonumber(arg[5])
assert(vmlinux and initrd and image and mib and timeout,
  "usage: lua5.4 bench/diskvm.lua VMLINUX INITRD IMAGE MEMORY_MIB TIMEOUT")

local KEYS = { "virtio_notifies", "virtio_chains", "virtio_irqs", "blk_reads", "blk_read_bytes",
               "blk_request_ns", "blk_io_ns" }

local ctx
local function report(phase)
  local s = ctx.vm:stats()
  local all = 0
  for _, n in pairs(s.exits) do all = all + n end
  local t = { "LUAKVM-HOST", phase, "exits=" .. all }
  for reason, n in pairs(s.exits) do t[#t + 1] = "exit_" .. reason .. "=" .. n end
  for _, k in ipairs(KEYS) do t[#t + 1] = k .. "=" .. (s[k] or 0) end
  t[#t + 1] = ("run_ns=%d"):format(math.floor(s.run_seconds * 1e9))
  io.stdout:write(table.concat(t, " "), "\n")
end

local partial = ""
local function output(bytes)
  io.stdout:write(bytes)
  partial = partial .. bytes
  for line in partial:gmatch("([^\n]*)\n") do
    local phase = line:gsub("\r", ""):match("^LUAKVM%-DISK (%S+)")
    if phase then report(phase) end
  end
  partial = partial:match("[^\n]*$")
  io.stdout:flush()
end

local err
ctx, err = linux.setup{ kernel = vmlinux, initrd = initrd, memory = mib << 20, output = output,
                        disks = { { path = image, readonly = true } } }
if not ctx then
  io.stderr:write("diskvm: ", err, "\n")
  os.exit(1)
end
local e = linux.run(ctx, { timeout = timeout })
report("end")
io.stdout:write("LUAKVM-HOST-EXIT ", tostring(e.reason), "\n")
ctx.vm:close()
