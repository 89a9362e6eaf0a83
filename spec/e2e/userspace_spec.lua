-- End-to-end: Debian's cloud kernel with the busybox initramfs (`make kernel`)
-- to /init and an interactive shell, typed at through the serial console.
-- Tagged e2e and userspace: kvm_pvm cannot run a guest's user mode, so on
-- such a host make test runs this nested (tools/test.sh), on kvm_amd under
-- QEMU TCG, where spawn to the shell's answer takes about 40 s.
local support = require "support"
local kvm = require "kvm"
local linux = require "kvm.linux"

local DIR = os.getenv("LUAKVM_KERNEL_DIR") or "guest-kernel"

local function exists(p)
  local f = io.open(p, "rb")
  if f then f:close() return true end
  return false
end

-- Boot the kernel with the initramfs, type a line ahead (before the kernel
-- has started), then a command once /init has printed its marker, then, once
-- the shell answered, `last` (default "poweroff -f"). setup: extra
-- linux.setup options. Returns the exit, ctx, and what was seen {ahead=, stage=}.
local function boot_to_shell(setup, last)
  local go, done = os.tmpname(), os.tmpname()
  os.remove(go); os.remove(done)
  local typist = assert(io.popen(("sh -c 'printf \"echo ahead-\\$((40+2))\\n\"; " ..
    "while [ ! -e %s ]; do sleep 0.2; done; " ..
    "printf \"echo luakvm-\\$((6*7))\\n\"; while [ ! -e %s ]; do sleep 0.2; done; " ..
    "printf \"%s\\n\"'"):format(go, done, last or "poweroff -f"), "r"))
  local seen, got, log = "", { stage = "init", ahead = false }, {}
  local function output(bytes)
    io.stderr:write(bytes)
    log[#log + 1] = bytes
    seen = (seen .. bytes):sub(-8192)
    if seen:find("ahead-42", 1, true) then got.ahead = true end
    if got.stage == "init" and seen:find("LUAKVM-INIT-OK", 1, true) then
      got.stage = "shell"
      seen = ""
      local f = assert(io.open(go, "w")); f:close()
    elseif got.stage == "shell" and seen:find("luakvm-42", 1, true) then
      got.stage = "done"
      local f = assert(io.open(done, "w")); f:close()
    end
  end
  local opts = { kernel = DIR .. "/vmlinux", initrd = DIR .. "/initramfs.cpio.gz",
                 memory = 128 << 20, output = output, input = typist }
  for k, v in pairs(setup or {}) do opts[k] = v end
  local ctx, err = linux.setup(opts)
  assert(ctx, err)
  ctx.log = function(msg) io.stderr:write("\n[userspace_spec] ", msg, "\n") end
  local t0 = kvm.now()
  local e = linux.run(ctx, { timeout = 180 })
  got.seconds = kvm.now() - t0
  got.stats = ctx.vm:stats()
  got.log = table.concat(log)
  local f = io.open(done, "w"); if f then f:close() end
  typist:close()
  os.remove(go); os.remove(done)
  ctx.vm:close()
  assert.are_not.equal("init", got.stage, "no LUAKVM-INIT-OK from /init; run ended with " .. tostring(e))
  assert.is_true(got.ahead, "what was typed ahead did not run (\"ahead-42\" never printed)")
  assert.equal("done", got.stage, "the shell did not answer; run ended with " .. tostring(e))
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
     "and powers off through ACPI on poweroff -f", function()
    need_kernel()
    local e, ctx, got = boot_to_shell()
    -- ACPI S5 through PM1a_CNT (kvm.pm): run() stopped, ctx.power says why
    assert.equal("stopped", e.reason, tostring(e))
    assert.equal("poweroff", ctx.power.state)
    -- the kernel found the tables and used them
    assert.is_nil(got.log:find("RSDP was not found", 1, true))
    for _, line in ipairs{ "ACPI: RSDP 0x00000000000E0000", "ACPI: APIC 0x", "ACPI: PM: (supports S0 S5)",
                           "IOAPIC[0]: apic_id", "Hypervisor detected: KVM", "clocksource: Switched to clocksource kvm-clock" } do
      assert.is_truthy(got.log:find(line, 1, true), "not in the kernel's log: " .. line)
    end
    assert.is_true(got.seconds < 150, ("took %.0f s"):format(got.seconds))
  end)

  it("without ACPI and with a command line of its own (the 8250 driver probes COM2-4, nobody " ..
     "answers): unclaimed ports read as all ones, the shell answers, poweroff -f halts", function()
    need_kernel()
    local e, ctx, got = boot_to_shell{ acpi = false,
      cmdline = "console=ttyS0 reboot=k panic=-1 pci=off nomodules" }
    assert.is_nil(ctx.acpi)
    assert.is_true(got.stats.unclaimed_io > 0, "no unclaimed port access was counted")
    assert.equal("halted", e.reason, tostring(e))
    assert.is_nil(ctx.power.state)
  end)

  it("boots the bzImage to its shell too, and reboot -f ends the run with 'reset'", function()
    need_kernel()
    if not exists(DIR .. "/bzImage") then return pending("no " .. DIR .. "/bzImage: run make kernel") end
    local e, ctx = boot_to_shell({ kernel = DIR .. "/bzImage" }, "reboot -f")
    assert.equal("bzimage", ctx.kind)
    assert.equal("reset", e.reason, tostring(e))
  end)
end)
