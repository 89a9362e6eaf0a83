-- End-to-end: boot_linux.lua --gdb --gdb-wait with Debian's kernel (make
-- kernel) and Debian's gdb in batch mode: gdb finds the guest stopped at the
-- kernel's first instruction, reads memory there, single-steps, sets a
-- hardware breakpoint a few instructions on and continues to it (where the
-- KVM has hardware breakpoints: not kvm_amd under QEMU's TCG), detaches; the
-- kernel then boots on to its console banner. Tagged e2e.
local support = require "support"

local DIR = os.getenv("LUAKVM_KERNEL_DIR") or "guest-kernel"

local exists = support.exists

local function slurp(p) return support.slurp(p, "") end

-- wait up to `seconds` for `pattern` in the file at path; its text
local function wait_for(path, pattern, seconds)
  local text
  for _ = 1, seconds * 10 do
    text = slurp(path)
    if text:find(pattern) then break end
    support.sh("sleep 0.1")
  end
  return text
end

describe("#e2e boot_linux.lua --gdb", function()
  it("gdb attaches before the first instruction, steps, breaks, detaches; the kernel boots on", function()
    support.need_kvm()
    if not exists(DIR .. "/vmlinux") then return pending("no " .. DIR .. "/vmlinux: run make kernel") end
    assert.equal(0, select(2, support.sh("gdb --version")), "gdb is not installed (apt-get install gdb)")
    local kvm = require "kvm"
    if os.getenv("LUAKVM_NESTED") == "1" then support.sh("ip link set lo up") end
    local info = kvm.host_info()
    local hw = info.module == "kvm_pvm" or info.hypervisor ~= "TCGTCGTCGTCG"
    -- a free port: the system's choice, given back
    local l = assert(kvm.tcp_listen("127.0.0.1", 0))
    local port = l:port()
    l:close()
    local out, err, pidfile = os.tmpname(), os.tmpname(), os.tmpname()
    assert(os.execute(("sh -c 'echo $$ >%s; exec timeout 300 lua5.4 examples/boot_linux.lua %s/vmlinux --mem 128 "
      .. "--gdb 127.0.0.1:%d --gdb-wait --timeout 60' </dev/null >%s 2>%s &"):format(pidfile, DIR, port, out, err)))
    local text = wait_for(err, "waiting for gdb", 60)
    assert.matches("boot_linux: gdb: target remote 127.0.0.1:" .. port, text, 1, true)
    local cmds = { "target remote 127.0.0.1:" .. port, "info registers rip", "x/4xb $pc", "stepi",
                   "info registers rip" }
    if hw then
      for _, c in ipairs{ "hbreak *($pc + 0x27)", "continue", "info registers rip" } do cmds[#cmds + 1] = c end
    end
    cmds[#cmds + 1] = "detach"
    local args = {}
    for _, c in ipairs(cmds) do args[#args + 1] = "-ex '" .. c .. "'" end
    local gtext, code = support.sh("timeout 120 gdb -q -batch -nx " .. table.concat(args, " ") .. " 2>&1")
    -- the kernel goes on: its banner on the console
    local console = wait_for(out, "Linux version 6%.", 120)
    local errtext = slurp(err)
    local pid = math.tointeger(tonumber(slurp(pidfile):match("%d+")))
    if pid then support.sh("kill " .. pid) end     -- the boot is no longer needed (timeout passes it on)
    os.remove(out) os.remove(err) os.remove(pidfile)
    assert.equal(0, code, gtext)
    -- the ELF vmlinux's entry, startup_64 at its physical address
    assert.matches("0x0000000001000000 in %?%? %(%)", gtext)
    assert.matches("rip%s+0x1000000%s+0x1000000", gtext)
    assert.matches("0x1000000:%s+0x48%s+0x8d%s+0x25%s+0x%x%x", gtext)   -- lea rsp, [rip + ...]
    assert.matches("rip%s+0x1000007%s+0x1000007", gtext)
    if hw then
      assert.matches("Hardware assisted breakpoint 1 at 0x100002e", gtext)
      assert.matches("Breakpoint 1, 0x000000000100002e in %?%? %(%)", gtext)
      assert.matches("rip%s+0x100002e%s+0x100002e", gtext)
    end
    assert.matches("%[Inferior 1 %(Remote target%) detached%]", gtext)
    assert.matches("boot_linux: gdb connected", errtext, 1, true)
    assert.matches("boot_linux: gdb disconnected", errtext, 1, true)
    assert.truthy(console:find("Linux version 6.", 1, true), console)
  end)
end)
