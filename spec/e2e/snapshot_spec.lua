-- End-to-end: boot_linux.lua --save-at TEXT FILE saves Debian's kernel at its
-- busybox shell (make kernel), and boot_linux.lua --restore FILE resumes it
-- in a new process, where the shell answers a typed command and powers off.
-- Tagged e2e and userspace: kvm_pvm cannot run a guest's user mode, so on
-- such a host make test runs this nested (tools/test.sh), on kvm_amd.
local support = require "support"
local kvm = require "kvm"

local DIR = os.getenv("LUAKVM_KERNEL_DIR") or "guest-kernel"

local function slurp(path) return support.slurp(path, "") end

-- Run boot_linux.lua with `args` in a child process, its stdin typed at by
-- `steps` ({wait = text on its stdout, or err = text on its stderr; send =
-- what to type}; a step without wait or err is typed at once: support.typist).
-- Returns its exit status, stdout, stderr, and the seconds from spawn to
-- each step sent.
local function drive(args, steps, timeout)
  local base = os.tmpname()
  local out, err, rc = base .. ".out", base .. ".err", base .. ".rc"
  local typed = {}
  for i, step in ipairs(steps) do typed[i] = { send = step.send, at_once = not (step.wait or step.err) } end
  local t0 = kvm.now()
  local typist = support.typist(typed, ("timeout %d lua5.4 examples/boot_linux.lua %s >%s 2>%s; echo $? >%s")
    :format(timeout, args, out, err, rc))
  local sent, at, seen_o, seen_e = 1, {}, 0, 0
  while not support.exists(rc) and kvm.now() - t0 < timeout + 30 do
    local o, e = slurp(out), slurp(err)
    local step = steps[sent]
    while step and not (step.wait or step.err) do
      at[sent], sent = kvm.now() - t0, sent + 1
      step = steps[sent]
    end
    if step then
      local hit = step.wait and o:find(step.wait, seen_o + 1, true) or
                  step.err and e:find(step.err, seen_e + 1, true)
      if hit then
        if step.wait then seen_o = hit else seen_e = hit end
        typist.go(sent)
        at[sent], sent = kvm.now() - t0, sent + 1
      end
    end
    os.execute("sleep 0.2")
  end
  typist.close()
  local code = tonumber(slurp(rc))
  local o, e = slurp(out), slurp(err)
  io.stderr:write("\n--- boot_linux.lua ", args, ": exit ", tostring(code), "\n", o, "\n--- stderr\n", e, "\n")
  os.remove(out) os.remove(err) os.remove(rc) os.remove(base)
  return code, o, e, at
end

describe("#e2e #userspace boot_linux.lua --save-at and --restore", function()
  it("save at the shell, resume in a new process, the shell answers", function()
    support.need_kvm()
    assert.is_true(support.exists(DIR .. "/vmlinux"), "no " .. DIR .. "/vmlinux: run make kernel")
    local file = os.tmpname()
    os.remove(file)
    local code, out, err, at = drive(("%s/vmlinux --initrd %s/initramfs.cpio.gz --mem 128 --save-at SAVE-2 %s")
      :format(DIR, DIR, file), {
        { wait = "LUAKVM-INIT-OK", send = "echo SAVE-$((1+1))\n" },
        { err = "saved the VM to " .. file, send = "echo after-save-$((2+2))\n" },
        { wait = "after-save-4", send = "poweroff\n" },
      }, 300)
    assert.equal(0, code, "the first run did not power off")
    assert.matches("after-save-4", out, 1, true)
    local size = assert(io.open(file, "rb")):seek("end")
    io.stderr:write(("[snapshot_spec] boot to the save: %.1f s; the file: %.1f MiB\n"):format(at[2], size / 2^20))
    assert.is_true(size > 1 << 20 and size < 128 << 20, "file size " .. size)

    local code2, out2, err2, at2 = drive("--restore " .. file, {
      { send = "\necho restored-$((6*7))\n" },
      { wait = "restored-42", send = "poweroff\n" },
    }, 120)
    io.stderr:write(("[snapshot_spec] spawn to the restored shell's answer: %.1f s\n"):format(at2[2] or -1))
    assert.equal(0, code2, "the restored run did not power off")
    assert.matches("restored-42", out2, 1, true)
    assert.not_matches("LUAKVM-INIT-OK", out2, 1, true)   -- it did not boot again
    assert.not_matches("Linux version", out2, 1, true)
    assert.matches("powered off", err2, 1, true)
    assert.is_string(err)

    -- a damaged file is refused before anything runs
    local f = assert(io.open(file, "r+b"))
    f:seek("set", size // 2)
    local b = f:read(1)
    f:seek("set", size // 2)
    f:write(string.char(b:byte() ~ 0x10))
    f:close()
    local code3, _, err3 = drive("--restore " .. file, {}, 60)
    assert.equal(1, code3)
    assert.matches(file, err3, 1, true)
    os.remove(file)
  end)
end)
