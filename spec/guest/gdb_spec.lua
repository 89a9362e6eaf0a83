--- kvm.gdb, the GDB remote stub, and kvm.socket under it: the protocol with
-- a client scripted from Lua (packets queued on the socket before the stub
-- reads them, the replies read back after), malformed input of every kind,
-- and Debian's gdb in batch mode against a tiny long-mode guest.
local support = require "support"

-- long mode: mov ecx, 5; 1: inc rax; loop 1b; hlt
local LOOP64 = "\xb9\x05\x00\x00\x00"  -- 0x1000 mov ecx, 5
            .. "\x48\xff\xc0"          -- 0x1005 inc rax
            .. "\xe2\xfb"              -- 0x1008 loop 0x1005
            .. "\xf4"                  -- 0x100a hlt

local SPIN = "\xeb\xfe"                -- jmp .

-- Debian's gdb in batch mode running `cmds` against `stub` (output to the
-- file `out`), the stub serving it until its run ends; gdb's last words come
-- after the stub is done, so wait for it to exit. Returns what stub:run
-- returned and gdb's output.
local function gdb_batch(stub, cmds, out)
  local args = {}
  for _, c in ipairs(cmds) do args[#args + 1] = "-ex '" .. c .. "'" end
  assert(os.execute("timeout 60 gdb -q -batch -nx " .. table.concat(args, " ") .. " >" .. out .. " 2>&1 &"))
  assert(stub:accept(30))
  local e = stub:run{ timeout = 60 }
  stub:close()
  local text
  for _ = 1, 100 do
    local f = assert(io.open(out))
    text = f:read("a")
    f:close()
    if text:find("killed%]") or text:find("detached%]") or text:find("exited normally") then break end
    support.sh("sleep 0.1")
  end
  os.remove(out)
  return e, text
end

describe("kvm.gdb", function()
  local kvm = require "kvm"
  local gdb = kvm.gdb

  -- tools/nested.sh's first-level guest leaves its loopback interface down
  -- (127.0.0.1: "Network is unreachable"): bring it up there
  setup(function()
    if os.getenv("LUAKVM_NESTED") == "1" then support.sh("ip link set lo up") end
  end)

  -- hardware execute breakpoints stop the guest here? (debug_spec.lua's `can`)
  local function hw_ok()
    local info = kvm.host_info()
    return info.module == "kvm_pvm" or info.hypervisor ~= "TCGTCGTCGTCG"
  end

  describe("framing (no VM)", function()
    it("checksums and escapes", function()
      assert.equal(0, gdb.checksum(""))
      assert.equal(0x67, gdb.checksum("g"))
      assert.equal("$OK#9a", gdb.frame("OK"))
      assert.equal("$#00", gdb.frame(""))
      assert.equal("$a}\x03b}\x04}]}\x0a#" .. ("%02x"):format(gdb.checksum("a}\x03b}\x04}]}\x0a")),
                   gdb.frame("a#b$}*"))
    end)

    it("the target description names gdb's amd64 registers in order", function()
      local names = {}
      for name in gdb.TARGET_XML:gmatch('<reg name="([^"]+)"') do names[#names + 1] = name end
      assert.equal(59, #names)
      assert.equal("rax", names[1])
      assert.equal("rip", names[17])
      assert.equal("eflags", names[18])
      assert.equal("gs", names[24])
      assert.equal("st0", names[25])
      assert.equal("fop", names[40])
      assert.equal("xmm0", names[41])
      assert.equal("mxcsr", names[57])
      assert.equal("gs_base", names[59])
      assert.matches("<architecture>i386:x86%-64</architecture>", gdb.TARGET_XML)
    end)
  end)

  describe("kvm.socket", function()
    it("listens, connects, accepts, sends and receives with timeouts", function()
      local l = assert(kvm.tcp_listen("127.0.0.1", 0))
      local port = l:port()
      assert.is_true(port > 0)
      assert.equal("kvm.socket listening on 127.0.0.1:" .. port, tostring(l))
      local none, why = l:accept(0)
      assert.is_nil(none)
      assert.equal("timeout", why)
      local c = assert(kvm.tcp_connect("localhost", port, 5))
      local s = assert(l:accept(5))
      assert.matches("^kvm.socket connected to 127.0.0.1:%d+$", tostring(s))
      assert.is_true(c:send("hello"))
      assert.equal("hello", s:recv(100, 5))
      assert.same({ nil, "timeout" }, { s:recv(100, 0) })
      c:close()
      assert.equal("kvm.socket (closed)", tostring(c))
      c:close()                                 -- again: nothing
      assert.same({ nil, "closed" }, { s:recv(100, 5) })
      local ok, msg, errno = kvm.tcp_listen("127.0.0.1", port)
      assert.is_nil(ok)
      assert.equal("bind: Address already in use", msg)
      assert.equal(98, errno)
      s:close()
      l:close()
      local refused = { kvm.tcp_connect("127.0.0.1", port, 5) }
      assert.same({ nil, "connect: Connection refused", 111 }, refused)
    end)

    it("raises for bad arguments and closed sockets", function()
      -- the name Lua finds for the function: kvm.tcp_listen or kvm.core.tcp_listen
      local function err(...) return (support.err(...):gsub("'kvm%.[%w.]-(tcp_%a+)'", "'%1'")) end
      assert.equal("bad argument #1 to 'tcp_listen' (an IPv4 address expected (like \"127.0.0.1\"))",
                   err(kvm.tcp_listen, "::1", 0))
      assert.equal("bad argument #2 to 'tcp_listen' (port out of range)", err(kvm.tcp_listen, "127.0.0.1", 65536))
      assert.equal("bad argument #2 to 'tcp_connect' (number expected, got no value)", err(kvm.tcp_connect, "127.0.0.1"))
      assert.equal("bad argument #3 to 'tcp_connect' (timeout: seconds from 0 to 1e6 expected)",
                   err(kvm.tcp_connect, "127.0.0.1", 1, -1))
      local l = assert(kvm.tcp_listen("127.0.0.1", 0))
      assert.equal("recv() on a listening socket", support.merr(l, "recv"))
      assert.equal("send() on a listening socket", support.merr(l, "send", "x"))
      assert.equal("bad argument #1 to 'accept' (timeout: seconds from 0 to 1e6 expected)",
                   support.merr(l, "accept", 0 / 0))
      local c = assert(kvm.tcp_connect("127.0.0.1", l:port(), 5))
      assert.equal("accept() on a socket that does not listen", support.merr(c, "accept", 0))
      assert.equal("bad argument #1 to 'recv' (1 to 1048576 bytes expected)", support.merr(c, "recv", 0))
      l:close()
      assert.equal("attempt to use a closed kvm.socket", support.merr(l, "accept", 0))
      assert.equal("attempt to use a closed kvm.socket", support.merr(l, "port"))
      c:close()
    end)
  end)

  describe("gdb.new", function()
    it("raises for bad options; a port in use is nil, message, errno", function()
      support.need_kvm()
      local vm, cpu = support.guest(LOOP64, { mode = "long" })
      local bad = {
        { { listen = "x" }, "bad option 'listen' to 'new' (\"HOST:PORT\" expected, HOST an IPv4 address)" },
        { { listen = "127.0.0.1:99999" }, "bad option 'listen' to 'new' (\"HOST:PORT\" expected, HOST an IPv4 address)" },
        { { listen = "example.org:1" }, "bad option 'listen' to 'new' (\"HOST:PORT\" expected, HOST an IPv4 address)" },
        { { listen = 5 }, "bad option 'listen' to 'new' (\"HOST:PORT\" or a kvm.socket expected)" },
        { {}, "bad option 'listen' to 'new' (\"HOST:PORT\" or a kvm.socket expected)" },
        { { listen = "127.0.0.1:0", sw_breakpoints = "x" },
          "bad option 'sw_breakpoints' to 'new' (\"int3\" or \"hw\" expected)" },
        { { listen = "127.0.0.1:0", slice = 0 }, "bad option 'slice' to 'new' (seconds from 0 to 10 expected)" },
      }
      for _, case in ipairs(bad) do
        assert.equal(case[2], support.err(gdb.new, cpu, case[1]))
      end
      assert.equal("bad argument #1 to 'new' (kvm.vcpu expected)", support.err(gdb.new, vm, { listen = "127.0.0.1:0" }))
      local l = assert(kvm.tcp_listen("127.0.0.1", 0))
      assert.same({ nil, "bind: Address already in use", 98 }, { gdb.new(cpu, { listen = "127.0.0.1:" .. l:port() }) })
      local stub = assert(gdb.new(cpu, { listen = l }))     -- a listening socket of the caller's
      assert.equal(l:port(), stub.port)
      stub:close()
    end)
  end)

  describe("the protocol, from a scripted client", function()
    local vm, cpu, ram, stub, client

    local function start(code, mode)
      vm, cpu, ram = support.guest(code or LOOP64, { mode = mode or "long" })
      stub = assert(gdb.new(cpu, { listen = "127.0.0.1:0" }))
      client = assert(kvm.tcp_connect("127.0.0.1", stub.port, 5))
      assert(stub:accept(5))
    end

    -- after a D or k: gdb connects again
    local function reconnect()
      if client then client:close() end
      client = assert(kvm.tcp_connect("127.0.0.1", stub.port, 5))
      assert(stub:accept(5))
    end

    after_each(function()
      if client then client:close() end
      if stub then stub:close() end
      vm, cpu, ram, stub, client = nil, nil, nil, nil, nil
    end)

    -- everything the stub sent, read until it has been quiet for a moment
    local function drain()
      local got = {}
      while true do
        local s = client:recv(65536, 0.2)
        if not s then break end
        got[#got + 1] = s
      end
      return table.concat(got)
    end

    -- the replies in what the stub sent: {acks = "++-", "reply1", ...},
    -- each reply's checksum checked
    local function parse(s)
      local out, acks, i = {}, {}, 1
      while i <= #s do
        local c = s:sub(i, i)
        if c == "$" then
          local hash = assert(s:find("#", i, true), "unterminated reply")
          local data = s:sub(i + 1, hash - 1)
          assert.equal(("%02x"):format(gdb.checksum(data)), s:sub(hash + 1, hash + 2))
          out[#out + 1] = data:gsub("}(.)", function(x) return string.char(x:byte() ~ 0x20) end)
          i = hash + 3
        else
          acks[#acks + 1] = c
          i = i + 1
        end
      end
      out.acks = table.concat(acks)
      return out
    end

    -- send packets (data strings, framed here; raw strings in {raw = ...}),
    -- let the stub serve them while stopped, return its replies and how the
    -- stop ended
    local function converse(items, ...)
      local parts = {}
      for _, it_ in ipairs(items) do
        parts[#parts + 1] = type(it_) == "table" and it_.raw or gdb.frame(it_)
      end
      assert(client:send(table.concat(parts)))
      local how = stub:stopped(nil, 5, true, ...)
      return parse(drain()), how
    end

    it("qSupported, ?, qAttached, qC, threads, vCont?, H, vMustReplyEmpty; D detaches", function()
      support.need_kvm()
      start()
      local r, how = converse{ "qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386", "?", "qAttached",
                               "qC", "qfThreadInfo", "qsThreadInfo", "vCont?", "Hg0", "Hc-1", "T1",
                               "vMustReplyEmpty", "qSymbol::", "D" }
      assert.equal("detach", how)
      assert.equal(("+"):rep(13), r.acks)
      assert.same({ "PacketSize=4000;qXfer:features:read+;vContSupported+;swbreak+;hwbreak+",
                    "T05thread:1;", "1", "QC1", "m1", "l", "vCont;c;C;s;S", "OK", "OK", "OK", "", "OK", "OK",
                    acks = r.acks }, r)
      assert.is_nil(stub.conn)
    end)

    it("qXfer:features:read: the target description in pieces", function()
      support.need_kvm()
      start()
      local n = #gdb.TARGET_XML
      local r = converse{ "qXfer:features:read:target.xml:0,100", ("qXfer:features:read:target.xml:100,%x"):format(n),
                          "qXfer:features:read:other.xml:0,100", "qXfer:features:read:target.xml:zz,1", "k" }
      assert.equal("m" .. gdb.TARGET_XML:sub(1, 256), r[1])
      assert.equal("l" .. gdb.TARGET_XML:sub(257), r[2])
      assert.equal("E00", r[3])
      assert.equal("E01", r[4])
    end)

    it("g: the registers in gdb's layout; G, p and P change and read them", function()
      support.need_kvm()
      start()
      cpu:set_regs{ rax = 0x1122334455667788, r15 = -2, rflags = 0x246 }
      local r = converse{ "g", "p10", "p0", "p11", "P0=efbeadde00000000", "P10=0510000000000000",
                          "p3b", "pzz", "P40=00", "P11=0200", "D" }
      local g = r[1]
      assert.equal(2 * (17 * 8 + 4 + 6 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 + 2 * 8), #g)
      assert.equal("8877665544332211", g:sub(1, 16))                    -- rax
      assert.equal("feffffffffffffff", g:sub(15 * 16 + 1, 16 * 16))     -- r15
      assert.equal("0010000000000000", g:sub(16 * 16 + 1, 17 * 16))     -- rip
      assert.equal("46020000", g:sub(17 * 16 + 1, 17 * 16 + 8))         -- eflags
      assert.equal("0010000000000000", r[2])
      assert.equal("8877665544332211", r[3])
      assert.equal("46020000", r[4])
      assert.equal("OK", r[5])
      assert.equal("OK", r[6])
      assert.equal("E01", r[7])    -- no register 0x3b
      assert.equal("E01", r[8])
      assert.equal("E01", r[9])    -- no register 0x40
      assert.equal("E01", r[10])   -- eflags is 4 bytes
      local regs = cpu:regs()
      assert.equal(0xdeadbeef, regs.rax)
      assert.equal(0x1005, regs.rip)
      -- G: the general registers from a g reply, rbx changed
      local g2 = g:sub(1, 16) .. "efcdab8967452301" .. g:sub(33)
      reconnect()
      r = converse{ "G" .. g2, "G123", "Gzz", "D" }
      assert.same({ "OK", "E01", "E01", "OK", acks = "++++" }, r)
      assert.equal(0x0123456789abcdef, cpu:regs().rbx)
      assert.equal(0x1000, cpu:regs().rip)
    end)

    it("m and M through the page tables; unmapped and outside RAM are E14", function()
      support.need_kvm()
      start()
      local r = converse{ "m1000,5", "M2000,4:01020304", "m2000,4", "m1fffff,2", "m200000,4",
                          "M200000,1:00", "m1000,0", "m1000", "m11112222333344445,1", "M2000,2:010", "M2000,2:01",
                          "m-1,2", "D" }
      -- m1fffff,2: the last byte of RAM, a partial read
      assert.same({ "b905000000", "OK", "01020304", "00", "E14", "E14", "", "E01", "E01", "E01", "E01", "E01",
                    "OK", acks = ("+"):rep(13) }, r)
      assert.equal("\1\2\3\4", vm:read(0x2000, 4))
      -- a read across a page boundary: the identity map, so both pages
      ram:write(0xffe, "\xaa\xbb")
      reconnect()
      r = converse{ "mffe,4", "D" }
      assert.equal("aabbb905", r[1])
      -- a length past the packet size is cut to what fits
      reconnect()
      r = converse{ "m0,100000", "D" }
      assert.equal(gdb.PACKET_SIZE - 4, #r[1])
    end)

    it("Z/z: breakpoints and watchpoints into the debug registers, z removes them", function()
      support.need_kvm()
      start()
      local r = converse{ "Z1,1008,1", "Z2,2000,4", "Z4,2008,8", "Z3,2000,4", "Z2,2001,4", "Z2,2000,3",
                          "Z1,1008,1", "Z0,1008,1", "Zx", "Z9,1,1", "D" }
      -- Z0 where Z1 already is: E22; Z3 (read watchpoints): not on x86
      assert.same({ "OK", "OK", "OK", "", "E22", "E22", "OK", "E22", "E01", "", "OK", acks = ("+"):rep(11) }, r)
      -- the detach removed them
      assert.same({}, cpu:guest_debug())
      reconnect()
      r = converse{ "Z1,1008,1", "Z2,2000,4", "Z4,2008,8", "Z1,1000,1", "Z1,1005,1", "z1,1000,1", "Z1,1005,1",
                    "z1,1008,1", "z2,2000,4", "z4,2008,8", "z1,1005,1", "z1,1005,1" , "D" }
      -- the fifth: no debug register (E28)
      assert.same({ "OK", "OK", "OK", "OK", "E28", "OK", "OK", "OK", "OK", "OK", "OK", "OK", "OK",
                    acks = ("+"):rep(13) }, r)
    end)

    it("Z0: an int3 in guest memory, or a debug register where int3 is not intercepted (kvm_pvm)", function()
      support.need_kvm()
      start()
      local r = converse{ "Z0,1005,1", "m1005,1", "k" }
      assert.same({ "OK", acks = "+++" }, { r[1], acks = r.acks })
      if kvm.host_info().module == "kvm_pvm" then
        assert.equal("48", r[2])
        assert.equal("hw", stub.swbp)
      else
        assert.equal("cc", r[2])
        assert.equal("int3", stub.swbp)
      end
      assert.equal("\x48", vm:read(0x1005, 1))   -- k took it out again
    end)

    it("s: one instruction, and the stop reply", function()
      support.need_kvm()
      start()
      local r = converse{ "s", "p10", "vCont;s:1", "p10", "vCont;x", "D" }
      assert.same({ "T05thread:1;", "0510000000000000", "T05thread:1;", "0810000000000000", "E01", "OK",
                    acks = "++++++" }, r)
    end)

    it("c and a hardware breakpoint: the stop reply says hwbreak; k kills", function()
      support.need_kvm()
      start()
      -- run() serves the queued packets, runs to the breakpoint, reports it
      -- and reads the next packet
      assert(client:send(gdb.frame("qSupported:hwbreak+") .. gdb.frame("Z1,1008,1") .. gdb.frame("c")
                         .. gdb.frame("k")))
      local e = stub:run{ timeout = 10 }
      local r = parse(drain())
      if hw_ok() then
        assert.equal("killed", e)
        assert.same({ "PacketSize=4000;qXfer:features:read+;vContSupported+;hwbreak+", "OK",
                      "T05thread:1;hwbreak:;", acks = "++++" }, r)
        assert.equal(0x1008, cpu:regs().rip)
        assert.equal(1, cpu:regs().rax)
      else
        -- no hardware breakpoints (kvm_amd under QEMU's TCG): on to the hlt
        assert.equal("hlt", e.reason)
        assert.same({ "PacketSize=4000;qXfer:features:read+;vContSupported+;hwbreak+", "OK", "W00",
                      acks = "+++" }, r)
      end
    end)

    it("Ctrl-C while the guest runs stops it (SIGINT), and the stub serves again", function()
      support.need_kvm()
      start(SPIN)
      assert(client:send(gdb.frame("c") .. "\3" .. gdb.frame("p10") .. gdb.frame("k")))
      local e = stub:run{ timeout = 10 }
      assert.equal("killed", e)
      assert.same({ "T02thread:1;", "0010000000000000", acks = "+++" }, parse(drain()))
    end)

    it("a client that connects while the guest runs stops it; one that goes away detaches", function()
      support.need_kvm()
      vm, cpu, ram = support.guest(SPIN, { mode = "long" })
      stub = assert(gdb.new(cpu, { listen = "127.0.0.1:0" }))
      client = assert(kvm.tcp_connect("127.0.0.1", stub.port, 5))
      assert(client:send(gdb.frame("?") .. gdb.frame("k")))
      assert.equal("killed", stub:run{ timeout = 10 })
      assert.same({ "T05thread:1;", acks = "++" }, parse(drain()))
      -- goes away: the run goes on without gdb to its timeout
      client = assert(kvm.tcp_connect("127.0.0.1", stub.port, 5))
      assert(client:send(gdb.frame("Z1,1000,1")))
      client:close()
      client = nil
      local e = stub:run{ timeout = 0.5 }
      assert.equal("timeout", e.reason)
      assert.is_nil(stub.conn)
      assert.same({}, cpu:guest_debug())
    end)

    it("malformed input: bad checksums get -, oversize and garbage E01 or nothing, never a crash", function()
      support.need_kvm()
      start()
      local huge = ("a"):rep(gdb.PACKET_SIZE + 10)
      local r = converse{
        { raw = "$g#00" },                                   -- bad checksum: -
        { raw = "$g#zz" },                                   -- not hex: -
        { raw = "xyz\0\255+-+" },                            -- noise between packets: ignored
        { raw = "$" .. huge .. "#00" },                       -- oversize, terminated: + E01
        { raw = "$" .. huge .. huge .. "#" .. "00" },         -- oversize, long: + E01 once
        "qFooBar", "", "vUnknown;x", "mzz,zz", "M1000", "P", "p", "Z", "z1", "c" .. ("f"):rep(20),
        "\255\0\1", "qXfer:features:read:target.xml", "g1", "s12345678901234567",
        "k" }
      assert.equal("--" .. ("+"):rep(17), r.acks)
      assert.same({ "E01", "E01", "", "", "", "E01", "E01", "E01", "E01", "E01", "E01", "E01", "", "E01", "", "E01",
                    acks = r.acks }, r)
      assert.equal(2, stub.stats.bad_checksum)
      -- a flood of noise and unterminated packets: dropped in bounded time and memory
      reconnect()
      local t0 = support.now()
      local flood = ("+-noise"):rep(40000) .. "$" .. ("x"):rep(300000) .. "$"
      r = converse{ { raw = flood }, { raw = "#00" }, "p10", "k" }
      assert.same({ "E01", "0010000000000000", acks = "+++" }, r)
      assert.is_true(support.now() - t0 < 5)
      -- the VM is fine: the guest runs to its hlt
      assert.equal(0x1000, cpu:regs().rip)
      assert.equal("hlt", cpu:run{ timeout = 5 }.reason)
    end)
  end)
  describe("several vCPUs as threads (spec/guest/smp.S on 2 vCPUs)", function()
    local stub, client

    -- the BSP at 0x1000 (protected mode) wakes the AP, which starts in
    -- real mode at 0x2000 (linear); ports 0x10 and 0x11 served here
    local function smp_vm()
      local vm, cpus = support.smp_guest(2)
      vm:on_io(0x10, function() end)
      vm:on_io(0x11, function() return kvm.STOP end)
      return vm, cpus
    end

    after_each(function()
      if client then client:close() end
      if stub then stub:close() end
      stub, client = nil, nil
    end)

    local function replies()
      local got = {}
      while true do
        local s = client:recv(65536, 0.2)
        if not s then break end
        got[#got + 1] = s
      end
      local out = {}
      for data in table.concat(got):gmatch("%$([^#]*)#%x%x") do out[#out + 1] = data end
      return out
    end

    local function rip(hex) return string.unpack("<i8", (hex:gsub("%x%x", function(b) return string.char(tonumber(b, 16)) end))) end

    it("lists both, reads each one's registers (Hg), breaks on the AP, steps it alone", function()
      support.need_kvm()
      local vm, cpus = smp_vm()
      stub = assert(gdb.new(cpus, { listen = "127.0.0.1:0" }))
      client = assert(kvm.tcp_connect("127.0.0.1", stub.port, 5))
      assert(stub:accept(5))
      local f = gdb.frame
      assert(client:send(f("qfThreadInfo") .. f("qsThreadInfo") .. f("qC") .. f("Hg2") .. f("p10") .. f("qC")
                         .. f("Hg1") .. f("p10") .. f("T2") .. f("T3") .. f("Hg3") .. f("qThreadExtraInfo,2")
                         .. f("?") .. f("Hgzz") .. f("H") .. f("qThreadExtraInfo,9") .. f("vCont;s:9") .. f("vCont;c:zz")
                         .. f("D")))
      assert.equal("detach", stub:stopped(nil, 5, true))
      local r = replies()
      assert.same({ "m1,2", "l", "QC1", "OK", "f0ff000000000000", "QC2", "OK", "0010000000000000", "OK", "E01", "E01",
                    ("vCPU 1"):gsub(".", function(c) return ("%02x"):format(c:byte()) end), "T05thread:1;",
                    "E01", "E01", "E01", "E01", "E01", "OK" }, r)
      -- a hardware breakpoint on the AP's code (real mode: 0x200:0004, linear 0x2004)
      client:close()
      client = assert(kvm.tcp_connect("127.0.0.1", stub.port, 5))
      assert(stub:accept(5))
      assert(client:send(f("qSupported:hwbreak+") .. f("Z1,2004,1") .. f("c") .. f("qC") .. f("p10") .. f("Hg1") .. f("p10")
                         .. f("vCont;s:2;c") .. f("Hg1") .. f("p10") .. f("Hg2") .. f("p10") .. f("k")))
      local e = stub:run{ timeout = 20 }
      r = replies()
      if not hw_ok() then
        assert.equal("stopped", e.reason)         -- no breakpoint fired: the BSP's port 0x11
        return
      end
      assert.equal("killed", e)
      assert.equal("OK", r[2])
      assert.equal("T05thread:2;hwbreak:;", r[3])
      assert.equal("QC2", r[4])
      assert.equal(4, rip(r[5]))                    -- the AP's ip
      local bsp = rip(r[7])
      assert.is_true(bsp >= 0x1000 and bsp < 0x1100)
      assert.equal("T05thread:2;", r[8])           -- the step: thread 2 alone
      assert.equal(bsp, rip(r[10]))                 -- the BSP did not move
      assert.equal(0xa, rip(r[12]))                 -- the AP: past mov $1, %eax
      assert.is_true(vm:read(0x3000, 4) == "\0\0\0\0")
    end)

    it("Debian's gdb: info threads lists both vCPUs; a breakpoint stops thread 1; stepi moves it", function()
      support.need_kvm()
      assert.equal(0, select(2, support.sh("gdb --version")), "gdb is not installed (apt-get install gdb)")
      local _, cpus = smp_vm()
      stub = assert(gdb.new(cpus, { listen = "127.0.0.1:0" }))
      local out = os.tmpname()
      -- 0x1059: the BSP's mov $0x11, %dx, once the AP has counted itself
      local cmds = { "target remote 127.0.0.1:" .. stub.port, "info threads", "hbreak *0x1059", "continue",
                     "info threads", "thread 2", "info registers rip", "thread 1", "stepi", "info registers rip",
                     "kill" }
      local e, text = gdb_batch(stub, cmds, out)
      assert.matches("%* 1%s+Thread 1 %(vCPU 0%) 0x0+1000 in", text)
      assert.matches("\n  2%s+Thread 2 %(vCPU 1%) 0x0+fff0 in", text)
      if hw_ok() then
        assert.equal("killed", e, text)
        assert.matches("Thread 1 hit Breakpoint 1, 0x0+1059 in", text)
        assert.matches("Switching to thread 2", text, 1, true)
        assert.matches("rip%s+0x105d%s+0x105d", text)   -- thread 1, one instruction on
        assert.not_matches("rip%s+0x1059", text)         -- thread 2's rip is the AP's, not the BSP's
      else
        assert.equal("stopped", e.reason, text)
        assert.matches("exited normally", text)
      end
    end)
  end)

  describe("with Debian's gdb in batch mode", function()
    it("connects, reads registers and memory, steps, sets a register, breaks, continues, detaches", function()
      support.need_kvm()
      assert.equal(0, select(2, support.sh("gdb --version")), "gdb is not installed (apt-get install gdb)")
      local vm, cpu = support.guest(LOOP64, { mode = "long" })
      local stub = assert(gdb.new(cpu, { listen = "127.0.0.1:0" }))
      local out = os.tmpname()
      local cmds = { "target remote 127.0.0.1:" .. stub.port, "info registers rip", "stepi", "stepi",
                     "info registers rip", "x/3xb 0x1005", "set $rcx = 1", "hbreak *0x100a", "continue",
                     "info registers rip rax rcx", "detach" }
      local e, text = gdb_batch(stub, cmds, out)
      assert.equal("hlt", e.reason, text)
      assert.matches("rip%s+0x1000%s+0x1000", text)
      assert.matches("rip%s+0x1008%s+0x1008", text)     -- two instructions later: mov, inc
      assert.matches("0x1005:%s+0x48%s+0xff%s+0xc0", text)
      assert.matches("Hardware assisted breakpoint 1 at 0x100a", text)
      if hw_ok() then
        assert.matches("Breakpoint 1, 0x000000000000100a in %?%? %(%)", text)
        assert.matches("rip%s+0x100a%s+0x100a", text)
        assert.matches("rax%s+0x1%s+1", text)           -- rcx = 1: one pass of the loop
        assert.matches("rcx%s+0x0%s+0", text)
        assert.matches("%[Inferior 1 %(Remote target%) detached%]", text)
      else
        assert.matches("exited normally", text)
      end
      assert.equal(1, cpu:regs().rax)
    end)
  end)
  describe("sandboxed", function()
    it("kvm.sandbox{allow = kvm.gdb.SANDBOX_ALLOW}: the stub serves a client; a new socket is refused", function()
      support.need_kvm()
      local code, out = support.child([[
        local support = require "support"
        local kvm = require "kvm"
        if os.getenv("LUAKVM_NESTED") == "1" then support.sh("ip link set lo up") end
        local vm, cpu = support.guest("\xb9\x05\x00\x00\x00\x48\xff\xc0\xe2\xfb\xf4", { mode = "long" })
        local stub = assert(kvm.gdb.new(cpu, { listen = "127.0.0.1:0" }))
        local client = assert(kvm.tcp_connect("127.0.0.1", stub.port, 5))
        assert(kvm.sandbox{ allow = kvm.gdb.SANDBOX_ALLOW })
        print("listen", kvm.tcp_listen("127.0.0.1", 0))
        assert(stub:accept(5))
        local g = kvm.gdb.frame
        assert(client:send(g("m1000,5") .. g("s") .. g("p10") .. g("Z1,100a,1") .. g("k")))
        print("stopped", stub:stopped(nil, 5, true))
        local got = {}
        while true do
          local s = client:recv(65536, 0.2)
          if not s then break end
          got[#got + 1] = s
        end
        print("replies", table.concat(got))
        print("run", cpu:run{ timeout = 5 }.reason)
      ]], 'ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" ')
      -- (under make check-memory: LeakSanitizer cannot work in a sandbox, see sandbox_spec.lua)
      assert.equal(0, code, out)
      assert.matches("listen\tnil\tsocket: Operation not permitted\t1\n", out, 1, true)
      assert.matches("stopped\tkill\n", out, 1, true)
      local f = gdb.frame
      assert.matches("replies\t+" .. f("b905000000") .. "+" .. f("T05thread:1;") .. "+" .. f("0510000000000000")
                     .. "+" .. f("OK") .. "+\n", out, 1, true)
      assert.matches("run\thlt\n", out, 1, true)
    end)
  end)
end)
