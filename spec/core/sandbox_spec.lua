--- kvm.sandbox{allow = {...}, action = "eperm"|"kill"} (csrc/sandbox.c): a
-- seccomp filter that leaves a set-up VMM only the system calls it needs.
--
-- A filter cannot be removed, so every case runs in a CHILD lua5.4
-- (support.child) and the test runner itself is never sandboxed.
local support = require "support"

-- a guest that reads port 0x10, stores the byte at 0x2000 and halts
local GUEST = [["\xe4\x10"       -- in al, 0x10
              .. "\xa2\x00\x20"  -- mov [0x2000], al
              .. "\xf4"]]        -- hlt

local function has_seccomp()
  local f = io.open("/proc/self/status")
  if not f then return false end
  local s = f:read("a")
  f:close()
  return s:match("\nSeccomp:") ~= nil
end

describe("kvm.sandbox #guest", function()
  if not has_seccomp() then pending("the kernel has no seccomp") return end

  --- run src in a child lua5.4; returns its exit code, output and how it
  -- ended. Under `make check-memory` the child has ASan preloaded: its
  -- LeakSanitizer needs ptrace and threads at exit, which the sandbox
  -- forbids, so leak checking is off in the child (only there).
  local function child(src)
    local name = os.tmpname()
    local f = assert(io.open(name, "w"))
    f:write('package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path\n',
            'package.cpath = "./?.so;" .. package.cpath\n', src)
    f:close()
    local p = assert(io.popen('ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" lua5.4 ' ..
                              name .. " 2>&1"))
    local out = p:read("a")
    local _, how, code = p:close()
    os.remove(name)
    return code, out, how
  end

  it("after kvm.sandbox(): a guest still runs to hlt through a Lua handler, forbidden calls fail with EPERM", function()
    support.need_kvm()
    local code, out = child([[
      local support = require "support"
      local kvm = require "kvm"
      local vm, cpu = support.guest(]] .. GUEST .. [[)
      local calls = 0
      vm:on_io(0x10, function(port, dir) calls = calls + 1; return 0x42 end)
      assert(kvm.sandbox())
      print("open", io.open("/tmp/luakvm-sandbox-test", "w"))
      print("execute", os.execute("true"))
      print("popen", pcall(io.popen, "true"))
      print("new vm", kvm.vm())
      print("load_elf", vm:load_elf("/etc/hostname"))
      local e = cpu:run{ timeout = 5 }
      print("run", e.reason, calls, vm:u8(0x2000))
      -- Lua's allocator, the GC, string work, the clock still work
      local t = {}
      for i = 1, 200000 do t[i] = { i } end
      t = nil
      collectgarbage()
      print("alloc", #string.rep("x", 20 << 20), os.clock() >= 0, kvm.now() > 0)
      print("done")
    ]])
    assert.equal(0, code, out)
    assert.matches("open\tnil\t/tmp/luakvm-sandbox-test: Operation not permitted\t1\n", out, 1, true)
    assert.matches("execute\tnil\tOperation not permitted\t1\n", out, 1, true)
    assert.matches("new vm\tnil\topen /dev/kvm: Operation not permitted", out, 1, true)
    assert.matches("load_elf\tnil\t/etc/hostname: Operation not permitted\t1\n", out, 1, true)
    assert.matches("run\thlt\t1\t66\n", out, 1, true)
    assert.matches("alloc\t20971520\ttrue\ttrue\n", out, 1, true)
    assert.matches("done\n", out, 1, true)
    assert.is_nil(io.open("/tmp/luakvm-sandbox-test"))
  end)

  it("snapshots work sandboxed: vm:snapshot, a guest's run, vm:restore (a fuzzing loop's reset)", function()
    support.need_kvm()
    local code, out = child([[
      local support = require "support"
      local kvm = require "kvm"
      local vm, cpu = support.guest(]] .. GUEST .. [[)
      local v = 0
      vm:on_io(0x10, function() v = v + 1; return v end)
      assert(kvm.sandbox())
      local snap = assert(vm:snapshot())
      for _ = 1, 3 do
        assert(vm:restore(snap))
        print("run", cpu:run{ timeout = 5 }.reason, vm:u8(0x2000))
      end
      print("save", snap:save("/tmp/luakvm-sandbox-snap"))
      print("done")
    ]])
    assert.equal(0, code, out)
    assert.matches("run\thlt\t1\nrun\thlt\t2\nrun\thlt\t3\n", out)
    assert.matches("save\tnil\t[^\n]*Operation not permitted", out)
    assert.matches("done\n", out, 1, true)
  end)

  it("vm:run's vCPU threads work sandboxed; a new process still cannot be made", function()
    support.need_kvm()
    local code, out = child([[
      local support = require "support"
      local kvm = require "kvm"
      local vm = support.smp_guest(4, { hammer = 100 })
      local seen, hammered = {}, 0
      vm:on_io(0x10, function(_, _, _, v) seen[#seen + 1] = v end)
      vm:on_io(0x12, function() hammered = hammered + 1 end)
      vm:on_io(0x11, function() return kvm.STOP end)
      assert(kvm.sandbox())
      for round = 1, 2 do
        local e = assert(vm:run{ timeout = 20 })
        table.sort(seen)
        print("run", round, e.reason, table.concat(seen, ","), hammered)
      end
      print("execute", os.execute("true"))
      print("popen", pcall(io.popen, "true"))
      print("done")
    ]])
    assert.equal(0, code, out)
    assert.matches("run\t1\tstopped\t0,1,2,3\t400\n", out, 1, true)
    assert.matches("run\t2\thalted\t0,1,2,3\t400\n", out, 1, true)
    assert.matches("execute\tnil\tOperation not permitted\t1\n", out, 1, true)
    assert.matches("done\n", out, 1, true)
  end)

  it("the run loop's timeout, the UART (output and input) and a handler error all work sandboxed", function()
    support.need_kvm()
    local input = os.tmpname()
    local f = assert(io.open(input, "wb"))
    f:write("ping\n\4")
    f:close()
    local code, out = child([[
      local support = require "support"
      local kvm = require "kvm"
      -- a spinning guest: the timeout needs timer_create and signals
      local vm1, spin = support.guest("\xeb\xfe")   -- jmp .
      -- the echo guest: serial input from a file opened before the sandbox
      local vm2 = assert(kvm.vm())
      vm2:memory{ guest = 0, size = 1 << 20 }
      vm2:debug_exit(0x501)
      local chunks = {}
      vm2:serial{ output = function(b) chunks[#chunks + 1] = b end,
                  input = assert(io.open("]] .. input .. [[", "rb")) }
      vm2:write(0x1000, support.slurp("spec/guest/serial_echo.bin"))
      local echo = vm2:vcpu(0)
      echo:set_sregs{ cs = { base = 0, selector = 0 }, ds = { base = 0, selector = 0 } }
      echo:set_regs{ rip = 0x1000, rflags = 2 }
      local vm3, failing = support.guest("\xe4\x10\xf4")   -- in al, 0x10; hlt
      vm3:on_io(0x10, function() error("handler says no") end)
      assert(kvm.sandbox())
      print("spin", spin:run{ timeout = 0.2 }.reason)
      local e = echo:run{ timeout = 10 }
      print("echo", e.reason, e.code, (table.concat(chunks):gsub("\n", "|")))
      print("error", select(2, pcall(failing.run, failing)):match("handler says no") ~= nil)
      print("after", failing:run().reason)
    ]])
    os.remove(input)
    assert.equal(0, code, out)
    assert.matches("spin\ttimeout\n", out, 1, true)
    assert.matches("echo\tdebug_exit\t0\tping|\n", out, 1, true)
    assert.matches("error\ttrue\n", out, 1, true)
    assert.matches("after\thlt\n", out, 1, true)
  end)

  it("virtio-blk (read, write, flush, discard) and virtio-rng work sandboxed", function()
    support.need_kvm()
    local img = os.tmpname()
    local f = assert(io.open(img, "wb"))
    f:write(("a"):rep(1024))
    f:close()
    local punches = support.punches_holes(img)
    local code, out = child([[
      local kvm = require "kvm"
      local vm = assert(kvm.vm())
      vm:memory{ guest = 0, size = 1 << 20 }
      assert(vm:irqchip())
      local blk = assert(vm:virtio_blk{ path = "]] .. img .. [[" })
      local rng = vm:virtio_rng()
      assert(kvm.sandbox())
      -- a driver: queue 0 of 8 at 0x10000 (desc), 0x11000 (avail), 0x12000 (used)
      -- the driver accepts what is offered of DISCARD (bit 13)
      local function request(dev, descs)
        vm:write(0x11000, ("\0"):rep(8))                  -- an empty avail ring
        for _, v in ipairs{ 0, 1, 3 } do dev:write(0x70, 4, v) end
        dev:write(0x14, 4, 0)
        local discard = dev:read(0x10, 4) & (1 << 13)
        dev:write(0x24, 4, 0); dev:write(0x20, 4, discard)
        dev:write(0x24, 4, 1); dev:write(0x20, 4, 1); dev:write(0x70, 4, 11)
        dev:write(0x38, 4, 8); dev:write(0x80, 4, 0x10000); dev:write(0x90, 4, 0x11000)
        dev:write(0xa0, 4, 0x12000); dev:write(0x44, 4, 1); dev:write(0x70, 4, 15)
        for i, d in ipairs(descs) do
          vm:write(0x10000 + 16 * (i - 1), string.pack("<I8I4I2I2", d[1], d[2], d[3], i))
        end
        vm:write(0x11000, string.pack("<I2I2I2", 0, 1, 0))
        dev:write(0x50, 4, 0)
        return vm:u16(0x12002), vm:u32(0x12008)
      end
      local function blk_req(typ, sector, data, len)
        vm:write(0x20000, string.pack("<I4I4I8", typ, 0, sector))
        if data then vm:write(0x20100, data) end
        local d = { { 0x20000, 16, 1 } }
        if len then d[2] = { 0x20100, len, data and 1 or 3 } end
        d[#d + 1] = { 0x20080, 1, 2 }
        request(blk, d)
        return vm:u8(0x20080)
      end
      print("write", blk_req(1, 1, ("z"):rep(512), 512))
      print("flush", blk_req(4, 0))
      vm:write(0x20100, ("\0"):rep(512))
      print("read", blk_req(0, 1, nil, 512), vm:read(0x20100, 4))
      blk:write(0x14, 4, 0)
      print("discard", blk:read(0x10, 4) & (1 << 13) ~= 0, blk_req(11, 0, string.pack("<I8I4I4", 0, 1, 0), 16))
      print("rng", request(rng, { { 0x30000, 32, 2 } }))
      print("errors", vm:stats().virtio_errors)
    ]])
    local data = support.slurp(img)
    os.remove(img)
    assert.equal(0, code, out)
    -- where the file system cannot punch, DISCARD is not offered: UNSUPP, the sector stays
    assert.matches("write\t0\nflush\t0\nread\t0\tzzzz\ndiscard\t" .. tostring(punches) .. "\t"
      .. (punches and "0" or "2") .. "\nrng\t1\t32\nerrors\t0\n", out, 1, true)
    assert.equal((punches and "\0" or "a"):rep(512) .. ("z"):rep(512), data)
  end)

  it("allow = {...} adds system calls; a second sandbox() narrows again", function()
    local path = os.tmpname()
    os.remove(path)
    local code, out = child([[
      local kvm = require "kvm"
      assert(kvm.sandbox{ allow = { "openat", "unlink" } })
      local f = assert(io.open("]] .. path .. [[", "w"))
      f:write("allowed")
      f:close()
      print("removed", os.remove("]] .. path .. [["))
      assert(kvm.sandbox())
      print("then", io.open("]] .. path .. [[", "w"))
    ]])
    assert.equal(0, code, out)
    assert.matches("removed\ttrue\n", out, 1, true)
    assert.matches("then\tnil\t" .. path .. ": Operation not permitted\t1\n", out, 1, true)
    assert.is_nil(io.open(path))
  end)

  it("action = 'kill': a forbidden call kills the process with SIGSYS", function()
    support.need_kvm()
    local code, out, how = child([[
      local support = require "support"
      local kvm = require "kvm"
      local vm, cpu = support.guest("\xf4")
      assert(kvm.sandbox{ action = "kill" })
      print("run", cpu:run().reason)
      io.stdout:flush()
      io.open("/tmp/luakvm-sandbox-kill", "w")
      print("not reached")
    ]])
    -- SIGSYS (31), seen through the shell io.popen runs: exit status 128 + 31
    assert.is_true((how == "signal" and code == 31) or (how == "exit" and code == 159),
                   tostring(how) .. " " .. tostring(code))
    assert.matches("run\thlt\n", out, 1, true)
    assert.is_nil(out:match("not reached"))
    assert.is_nil(io.open("/tmp/luakvm-sandbox-kill"))
  end)

  it("bad options raise before anything is installed", function()
    local code, out = child([[
      local kvm = require "kvm"
      local function e(opts) local ok, msg = pcall(kvm.sandbox, opts); print(ok, msg) end
      e{ allow = { "no_such_call" } }
      e{ allow = { 42 } }
      e{ allow = "openat" }
      e{ action = "explode" }
      e{ action = {} }
      e(42)
      -- nothing was installed: this still works
      local f = assert(io.open("/dev/null", "w"))
      f:close()
      print("still free")
    ]])
    assert.equal(0, code, out)
    out = out:gsub("'kvm%.core%.sandbox'", "'kvm.sandbox'")   -- as Lua finds the name
    local want = {
      "false\tbad option 'allow' to 'sandbox' (unknown system call 'no_such_call')",
      "false\tbad option 'allow' to 'sandbox' (entry 1 is not a string)",
      "false\tbad option 'allow' to 'sandbox' (table of system call names expected)",
      "false\tbad option 'action' to 'sandbox' (\"eperm\" or \"kill\" expected)",
      "false\tbad option 'action' to 'sandbox' (\"eperm\" or \"kill\" expected)",
      "false\tbad argument #1 to 'kvm.sandbox' (table expected, got number)",
      "still free",
    }
    assert.equal(table.concat(want, "\n") .. "\n", out)
  end)

  it("the process reports the filter (/proc/self/status: Seccomp 2, NoNewPrivs 1)", function()
    local code, out = child([[
      local kvm = require "kvm"
      local f = assert(io.open("/proc/self/status"))   -- opened before
      assert(kvm.sandbox())
      local s = f:read("a")
      print(s:match("NoNewPrivs:%s*(%d)"), s:match("Seccomp:%s*(%d)"))
    ]])
    assert.equal(0, code, out)
    assert.equal("1\t2\n", out)
  end)
end)
