--- No file descriptor of the core leaks into child processes: /dev/kvm, the
-- VM and vCPU fds (and anything else the core opens) are O_CLOEXEC, so a
-- program started with os.execute or io.popen while VMs exist sees none of
-- them.
--
-- The test process may itself have inherited descriptors from whatever
-- started it (a CI runner's pipes), so a child is compared with a child
-- started before any VM existed; and a fresh lua5.4 child, which starts
-- with only 0, 1 and 2, must show its own child exactly 0, 1, 2 and the
-- directory `ls` opens.
local support = require "support"

--- What a child sees: { [fd] = target } from `ls -l /proc/self/fd`, run by
-- io.popen (mode "popen") or os.execute into a file (mode "execute").
local function child_fds(mode)
  local text
  if mode == "popen" then
    local p = assert(io.popen("exec ls -l /proc/self/fd"))
    text = p:read("a")
    p:close()
  else
    local out = os.tmpname()
    assert(os.execute("exec ls -l /proc/self/fd > " .. out))
    local f = assert(io.open(out))
    text = f:read("a")
    f:close()
    os.remove(out)
  end
  local t = {}
  for fd, target in text:gmatch(" (%d+) %-> ([^\n]*)") do t[tonumber(fd)] = target end
  return t
end

--- The targets that look like KVM objects.
local function kvm_targets(t)
  local bad = {}
  for fd, target in pairs(t) do
    if target:match("kvm") or target:match("anon_inode") or target:match("memfd") then
      bad[#bad + 1] = fd .. " -> " .. target
    end
  end
  table.sort(bad)
  return bad
end

--- fds without their targets (pipe and ls's own directory numbers vary)
local function numbers(t)
  local n = {}
  for fd in pairs(t) do n[#n + 1] = fd end
  table.sort(n)
  return n
end

describe("file descriptors and child processes #guest", function()
  local kvm = require "kvm"

  for _, mode in ipairs{ "popen", "execute" } do
    it("a child started with " .. (mode == "popen" and "io.popen" or "os.execute") ..
       " while a VM, memory, vCPUs, irqchip and UART exist sees none of their fds", function()
      support.need_kvm()
      local baseline = child_fds(mode)
      local vm = assert(kvm.vm())
      assert(vm:irqchip())
      vm:pit()
      local ram = vm:memory{ guest = 0, size = 1 << 20 }
      local cpu0 = assert(vm:vcpu(0))
      local cpu1 = assert(vm:vcpu(1))
      vm:serial{ output = function() end }
      -- the vCPU has run (run() sets up a timer and signal handlers)
      ram:write(0x1000, "\xf4")
      require("kvm.x86").real_mode(cpu0)
      cpu0:set_regs{ rip = 0x1000, rflags = 2 }
      cpu0:run{ timeout = 0.1 }
      local seen = child_fds(mode)
      assert.same({}, kvm_targets(seen))
      assert.same(numbers(baseline), numbers(seen))
      vm:close()
      cpu0:close(); cpu1:close()
    end)
  end

  it("the parent does hold them (the check above can see a leak)", function()
    support.need_kvm()
    local vm = assert(kvm.vm())
    local cpu = assert(vm:vcpu(0))
    local p = assert(io.popen("ls -l /proc/" .. support.pid() .. "/fd"))
    local text = p:read("a")
    p:close()
    assert.matches("kvm%-vm", text)
    assert.matches("kvm%-vcpu", text)
    cpu:close()
    vm:close()
  end)

  it("a fresh lua5.4 with VMs open starts children with only 0, 1, 2 (and ls's directory)", function()
    support.need_kvm()
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write([[
      package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
      package.cpath = "./?.so;" .. package.cpath
      local kvm = require "kvm"
      local vms = {}
      for i = 1, 3 do
        local vm = assert(kvm.vm())
        vm:memory{ guest = 0, size = 1 << 20 }
        vm:load_elf("/nonexistent")          -- an open that failed
        vms[i] = { vm, assert(vm:vcpu(0)) }
      end
      local p = assert(io.popen("exec ls /proc/self/fd"))
      local fds = {}
      for l in p:lines() do fds[#fds + 1] = l end
      p:close()
      print("child fds: " .. table.concat(fds, " "))
    ]])
    f:close()
    -- start lua5.4 with every descriptor above 2 closed (this process may
    -- have inherited some from whatever started it)
    local p = assert(io.popen("exec bash -c 'for fd in $(ls /proc/$$/fd); do [ $fd -gt 2 ] && eval \"exec $fd>&-\"; done; " ..
                              "exec lua5.4 " .. script .. "' 2>&1"))
    local out = p:read("a")
    local _, _, code = p:close()
    os.remove(script)
    assert.equal(0, code, out)
    -- stdin, stdout, stderr, and the directory ls reads
    assert.matches("child fds: 0 1 2 3\n", out, 1, true)
  end)

  it("a failed vm:load_elf, memory:load and linux.setup close what they opened", function()
    support.need_kvm()
    local vm = assert(kvm.vm())
    local ram = vm:memory{ guest = 0, size = 1 << 20 }
    support.gc()
    -- fd -> target, pipes by number only (the pipe to ls is new each time)
    local function ls()
      local p = assert(io.popen("ls -l /proc/" .. support.pid() .. "/fd"))
      local t = {}
      -- pipes are left out: popen'd FILEs of earlier specs may be collected
      -- at any time, and none of the calls below could open a pipe
      for fd, target in p:read("a"):gmatch(" (%d+) %-> ([^\n]*)") do
        if not target:match("^pipe:") then t[#t + 1] = fd .. " -> " .. target end
      end
      p:close()
      return table.concat(t, "\n")
    end
    local before = ls()
    for _ = 1, 50 do
      assert.is_nil(vm:load_elf("/dev/null"))
      assert.is_nil(vm:load_elf("/tmp"))
      assert.is_nil(ram:load(0, "/tmp"))
      assert.is_nil(ram:load(0, "/dev/null"))
      assert.is_nil((require "kvm.linux").setup{ kernel = "/dev/zero", memory = 32 << 20, profile = false })
    end
    support.gc()
    assert.equal(before, ls())
    vm:close()
  end)
end)
