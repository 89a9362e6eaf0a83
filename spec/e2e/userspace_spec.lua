-- End-to-end: Debian's cloud kernel with the busybox initramfs (`make kernel`)
-- to /init and an interactive shell, typed at through the serial console.
-- Tagged e2e and userspace: kvm_pvm cannot run a guest's user mode, so on
-- such a host make test runs this nested (tools/test.sh), on kvm_amd under
-- QEMU TCG, where spawn to the shell's answer takes about 40 s.
local support = require "support"
local kvm = require "kvm"
local linux = require "kvm.linux"

local DIR = os.getenv("LUAKVM_KERNEL_DIR") or "guest-kernel"

local exists = support.exists

-- 16 KiB pasted at the shell in one go: 256 numbered lines of 64 bytes, and
-- its MD5 as the host's md5sum computes it
local function paste()
  local lines = {}
  for i = 1, 256 do
    lines[i] = ("%05d "):format(i) .. ("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVW"):sub(1, 57) .. "\n"
  end
  local data = table.concat(lines)
  assert(#data == 16384)
  local tmp = os.tmpname()
  local f = assert(io.open(tmp, "wb")); f:write(data); f:close()
  local sum = assert(io.popen("md5sum " .. tmp)):read("l"):match("^(%x+)")
  os.remove(tmp)
  return data, sum
end

-- Boot the kernel with the initramfs: a line typed ahead (before the kernel
-- has started), a command once /init has printed its marker, the `more`
-- steps, then `last` (default "poweroff"). setup: extra linux.setup options.
-- Returns the exit, ctx, and what was seen {ahead=, stage=, seconds=, stats=, log=}.
local function boot_to_shell(setup, last, more)
  local steps = {
    { send = "echo ahead-$((40+2))\n", at_once = true },   -- typed before the kernel starts
    { wait = "LUAKVM-INIT-OK", send = "echo luakvm-$((6*7))\n" },
  }
  local wait = "luakvm-42"
  for _, m in ipairs(more or {}) do
    steps[#steps + 1] = { wait = wait, send = m.send }
    wait = m.wait
  end
  steps[#steps + 1] = { wait = wait, send = (last or "poweroff") .. "\n" }
  local typist = support.typist(steps)
  local seen, got, log = "", { stage = 2, ahead = false }, {}
  local function output(bytes)
    io.stderr:write(bytes)
    log[#log + 1] = bytes
    seen = (seen .. bytes):sub(-8192)
    if seen:find("ahead-42", 1, true) then got.ahead = true end
    local step = steps[got.stage]
    if step and seen:find(step.wait, 1, true) then
      typist.go(got.stage)
      got.stage = got.stage + 1
      seen = ""
    end
  end
  local opts = { kernel = DIR .. "/vmlinux", initrd = DIR .. "/initramfs.cpio.gz",
                 memory = 128 << 20, output = output, input = typist.pipe }
  for k, v in pairs(setup or {}) do opts[k] = v end
  local ctx, err = linux.setup(opts)
  assert(ctx, err)
  ctx.log = function(msg) io.stderr:write("\n[userspace_spec] ", msg, "\n") end
  local t0 = kvm.now()
  local e = linux.run(ctx, { timeout = 180 })
  got.seconds = kvm.now() - t0
  got.stats = ctx.vm:stats()
  got.log = table.concat(log)
  typist.close()
  ctx.vm:close()
  assert.is_true(got.stage > 2, "no LUAKVM-INIT-OK from /init; run ended with " .. tostring(e))
  assert.is_true(got.ahead, "what was typed ahead did not run (\"ahead-42\" never printed)")
  assert.is_true(got.stage > #steps, ("the shell did not answer %q; run ended with %s")
    :format(steps[math.min(got.stage, #steps)].wait, tostring(e)))
  return e, ctx, got
end

local function need_kernel()
  support.need_kvm()
  if not exists(DIR .. "/vmlinux") or not exists(DIR .. "/initramfs.cpio.gz") then
    return pending("no kernel or initramfs in " .. DIR .. ": run make kernel")
  end
end

describe("#e2e #userspace Linux to a shell", function()
  it("reaches /init, runs what was typed ahead, answers a command typed at its shell, " ..
     "takes a 16 KiB paste whole, and powers off through ACPI on poweroff", function()
    need_kernel()
    local data, sum = paste()
    local e, _, got = boot_to_shell(nil, "poweroff",
      { { send = "head -c 16384 | md5sum\n" .. data, wait = sum } })
    -- ACPI S5 through PM1a_CNT (vm:power)
    assert.equal("poweroff", e.reason, tostring(e))
    -- the kernel found the tables and used them
    assert.is_nil(got.log:find("RSDP was not found", 1, true))
    for _, line in ipairs{ "ACPI: RSDP 0x00000000000E0000", "ACPI: APIC 0x", "ACPI: PM: (supports S0 S5)",
                           "IOAPIC[0]: apic_id", "Hypervisor detected: KVM", "clocksource: Switched to clocksource kvm-clock",
                           "TSC deadline timer available" } do
      assert.is_truthy(got.log:find(line, 1, true), "not in the kernel's log: " .. line)
    end
    assert.is_true(got.seconds < 150, ("took %.0f s"):format(got.seconds))
  end)

  it("without ACPI and with a command line of its own (the 8250 driver probes COM2-4, nobody " ..
     "answers): unclaimed ports read as all ones, the shell answers, poweroff halts", function()
    need_kernel()
    local e, ctx, got = boot_to_shell{ acpi = false,
      cmdline = "console=ttyS0 reboot=k panic=-1 pci=off nomodules" }
    assert.is_nil(ctx.acpi)
    assert.is_true(got.stats.unclaimed_io > 0, "no unclaimed port access was counted")
    assert.equal("halted", e.reason, tostring(e))
  end)

  it("boots with 2 CPUs (the guest starts the second through INIT/SIPI, each a thread here): " ..
     "nproc says 2, poweroff ends every vCPU", function()
    need_kernel()
    local e, ctx, got = boot_to_shell({ cpus = 2 }, "poweroff",
      { { send = "echo cpus-$(nproc)\n", wait = "cpus-2" } })
    assert.equal("poweroff", e.reason, tostring(e))
    assert.equal(2, #ctx.cpus)
    assert.is_truthy(got.log:find("smpboot: Total of 2 processors activated", 1, true),
      "the kernel did not bring up 2 CPUs")
    for i, cpu in ipairs(ctx.cpus) do
      assert.is_true(cpu:stats().exits > 0, ("vCPU %d never ran"):format(i - 1))
    end
  end)

  it("boots the bzImage to its shell too, and reboot ends the run with 'reset'", function()
    need_kernel()
    if not exists(DIR .. "/bzImage") then return pending("no " .. DIR .. "/bzImage: run make kernel") end
    local e, ctx = boot_to_shell({ kernel = DIR .. "/bzImage" }, "reboot")
    assert.equal("bzimage", ctx.kind)
    assert.equal("reset", e.reason, tostring(e))
  end)
end)
