-- End-to-end: Debian's cloud kernel with the busybox initramfs (`make kernel`)
-- to /init and an interactive shell, typed at through the serial console.
-- Tagged e2e and userspace: kvm_pvm cannot run a guest's user mode, so on
-- such a host make test runs this nested (tools/test.sh), on kvm_amd under
-- QEMU TCG, where spawn to the shell's answer takes about 40 s.
local support = require "support"
local linux = require "kvm.linux"

local DIR = os.getenv("LUAKVM_KERNEL_DIR") or "guest-kernel"

local function exists(p)
  local f = io.open(p, "rb")
  if f then f:close() return true end
  return false
end

describe("#e2e #userspace Linux to a shell", function()
  it("reaches /init, which prints its marker, runs what was typed ahead, answers a command typed at its shell, " ..
     "and powers off through ACPI on poweroff -f", function()
    support.need_kvm()
    if not exists(DIR .. "/vmlinux") or not exists(DIR .. "/initramfs.cpio.gz") then
      return pending("no kernel or initramfs in " .. DIR .. ": run make kernel")
    end
    -- the keyboard: a child that types a line ahead, before the kernel has
    -- started, then a command once told to, then, told again, "poweroff -f"
    local go, done = os.tmpname(), os.tmpname()
    os.remove(go); os.remove(done)
    local typist = assert(io.popen(("sh -c 'printf \"echo ahead-\\$((40+2))\\n\"; " ..
      "while [ ! -e %s ]; do sleep 0.2; done; " ..
      "printf \"echo luakvm-\\$((6*7))\\n\"; while [ ! -e %s ]; do sleep 0.2; done; " ..
      "printf \"poweroff -f\\n\"'"):format(go, done), "r"))
    local seen, ctx = "", nil
    local stage = "init"
    local ahead = false
    local function output(bytes)
      io.stderr:write(bytes)
      seen = (seen .. bytes):sub(-8192)
      if seen:find("ahead-42", 1, true) then ahead = true end
      if stage == "init" and seen:find("LUAKVM-INIT-OK", 1, true) then
        stage = "shell"
        seen = ""
        local f = assert(io.open(go, "w")); f:close()
      elseif stage == "shell" and seen:find("luakvm-42", 1, true) then
        stage = "done"
        local f = assert(io.open(done, "w")); f:close()
      end
    end
    local err
    ctx, err = linux.setup{ kernel = DIR .. "/vmlinux", initrd = DIR .. "/initramfs.cpio.gz",
                            memory = 128 << 20, output = output, input = typist }
    assert(ctx, err)
    ctx.log = function(msg) io.stderr:write("\n[userspace_spec] ", msg, "\n") end
    local e = linux.run(ctx, { timeout = 600 })
    local f = io.open(done, "w"); if f then f:close() end
    typist:close()
    os.remove(go); os.remove(done)
    ctx.vm:close()
    assert.are_not.equal("init", stage, "no LUAKVM-INIT-OK from /init; run ended with " .. tostring(e))
    assert.is_true(ahead, "what was typed ahead did not run (\"ahead-42\" never printed)")
    assert.equal("done", stage, "the shell did not answer; run ended with " .. tostring(e))
    -- ACPI S5 through PM1a_CNT (kvm.pm): run() stopped, ctx.power says why
    assert.equal("stopped", e.reason, tostring(e))
    assert.equal("poweroff", ctx.power.state)
  end)
end)
