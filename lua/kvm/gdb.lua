--- A GDB remote stub: debug a guest's vCPUs with gdb over TCP.
--
--     local stub = assert(kvm.gdb.new(cpu, { listen = "127.0.0.1:1234" }))
--     -- or kvm.gdb.new({ cpu0, cpu1 }, ...): every vCPU a thread of gdb's
--     stub:accept()            -- wait for gdb: target remote 127.0.0.1:1234
--     local e = stub:run()     -- the guest under gdb's control
--
-- The GDB remote serial protocol (sourceware.org/gdb/onlinedocs/gdb/Remote-Protocol.html)
-- on a `kvm.socket` of the core, in all-stop mode, each vCPU a thread (thread
-- id = vCPU id + 1). Packets: qSupported
-- (PacketSize, qXfer:features:read, swbreak, hwbreak, vContSupported),
-- qXfer:features:read:target.xml (x86-64: the core, SSE and segment-base
-- registers), ?, g/G, p/P, m/M (guest-virtual addresses through the guest's
-- page tables; physical while paging is off), c/C, s/S, vCont? and vCont;c/s,
-- Z0/z0 (software breakpoints: int3, or a debug register where the KVM does
-- not intercept int3: kvm_pvm), Z1/z1 (hardware), Z2/z2 (write watchpoints),
-- Z4/z4 (access watchpoints), Ctrl-C while the guest runs, D (detach), k
-- (kill), qAttached, qC, qfThreadInfo/qsThreadInfo, qThreadExtraInfo, Hg
-- (the vCPU g/G/p/P/m/M act on), Hc (the vCPU s steps), T, vMustReplyEmpty;
-- anything else gets the empty reply ("not supported"). A bad checksum gets
-- "-" (gdb sends it again), a packet longer than PacketSize or one that does
-- not parse gets an "E" reply; a client that goes away detaches.
--
-- While the guest runs, `stub:run` runs it in slices of `slice` seconds and
-- looks at the socket between them (Ctrl-C, a new client). A script with a
-- run loop of its own calls `stub:poll()` between its runs and
-- `stub:stopped(e)` on a "debug" exit (boot_linux.lua --gdb does).
--
-- With several vCPUs, `c` runs them all (`vm:run{cpus = ...}`), each on a
-- thread; the first to stop (a breakpoint, a watchpoint) stops the others,
-- and the stop reply names it (`T05thread:N;`), which becomes the current
-- thread (Hg and Hc). A step (`s`, `vCont;s:N`, also `vCont;s:N;c`) steps
-- that one vCPU only, the others stay stopped. Breakpoints and watchpoints
-- are set in every vCPU's debug registers (an int3 once in memory, every
-- vCPU intercepting it).
-- @module kvm.gdb
local kvm = require "kvm"
local kdebug = require "kvm.debug"

local M = {}

--- The largest packet accepted and offered (PacketSize).
M.PACKET_SIZE = 0x4000

--- The system calls the stub needs beyond kvm.sandbox()'s default set, once
-- it listens: `kvm.sandbox{allow = kvm.gdb.SANDBOX_ALLOW}` after `gdb.new`.
M.SANDBOX_ALLOW = { "accept4", "recvfrom", "sendto", "setsockopt", "getsockname" }

local SIGINT, SIGTRAP = 2, 5
local fmt = string.format

--- The checksum of a packet's data: the sum of its bytes modulo 256.
-- @tparam string s
-- @treturn integer
function M.checksum(s)
  local sum = 0
  for i = 1, #s do sum = sum + s:byte(i) end
  return sum & 0xff
end

--- A packet: `$data#cs`, with `$`, `#`, `}` and `*` in data escaped.
-- @tparam string data
-- @treturn string
function M.frame(data)
  data = data:gsub("[%$#%}%*]", function(c) return "}" .. string.char(c:byte() ~ 0x20) end)
  return "$" .. data .. "#" .. fmt("%02x", M.checksum(data))
end

local function tohex(s)
  return (s:gsub(".", function(c) return fmt("%02x", c:byte()) end))
end

local function fromhex(h)
  if #h % 2 ~= 0 or h:find("[^%x]") then return nil end
  return (h:gsub("%x%x", function(b) return string.char(tonumber(b, 16)) end))
end

-- a hex number of 1 to 16 digits (a 64-bit address wraps to a negative integer)
local function hexnum(s)
  if not s or not s:match("^%x+$") or #s > 16 then return nil end
  return tonumber(s, 16)
end

-- registers, in gdb's amd64 order (the target description below):
-- name, bytes, where: "r" kvm_regs field, "s" a segment's selector, "b" a
-- segment's base, "f" a kvm_fpu field, "st"/"xmm" an FPU/SSE register
local REGS = {}
for _, r in ipairs{ "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip" } do
  REGS[#REGS + 1] = { name = r, size = 8, from = "r", field = r }
end
REGS[#REGS + 1] = { name = "eflags", size = 4, from = "r", field = "rflags" }
for _, s in ipairs{ "cs", "ss", "ds", "es", "fs", "gs" } do
  REGS[#REGS + 1] = { name = s, size = 4, from = "s", field = s }
end
for i = 0, 7 do REGS[#REGS + 1] = { name = "st" .. i, size = 10, from = "st", index = i + 1 } end
for _, f in ipairs{ { "fctrl", "fcw" }, { "fstat", "fsw" }, { "ftag", "ftwx" }, { "fiseg" },
                    { "fioff", "last_ip" }, { "foseg" }, { "fooff", "last_dp" }, { "fop", "last_opcode" } } do
  REGS[#REGS + 1] = { name = f[1], size = 4, from = "f", field = f[2] }
end
for i = 0, 15 do REGS[#REGS + 1] = { name = "xmm" .. i, size = 16, from = "xmm", index = i + 1 } end
REGS[#REGS + 1] = { name = "mxcsr", size = 4, from = "f", field = "mxcsr" }
REGS[#REGS + 1] = { name = "fs_base", size = 8, from = "b", field = "fs" }
REGS[#REGS + 1] = { name = "gs_base", size = 8, from = "b", field = "gs" }
M.REGS = REGS

local function reg_xml(r)
  local t = r.size == 10 and "i387_ext" or r.size == 16 and "uint128"
            or (r.name == "rip" and "code_ptr") or ((r.name == "rsp" or r.name == "rbp") and "data_ptr")
            or (r.size == 8 and "int64") or "int32"
  return fmt('<reg name="%s" bitsize="%d" type="%s"/>', r.name, r.size * 8, t)
end

--- The target description sent for qXfer:features:read:target.xml.
M.TARGET_XML = (function()
  local out = { '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target version="1.0">',
                "<architecture>i386:x86-64</architecture>", '<feature name="org.gnu.gdb.i386.core">' }
  for i = 1, 40 do out[#out + 1] = reg_xml(REGS[i]) end
  out[#out + 1] = '</feature><feature name="org.gnu.gdb.i386.sse">'
  for i = 41, 57 do out[#out + 1] = reg_xml(REGS[i]) end
  out[#out + 1] = '</feature><feature name="org.gnu.gdb.i386.segments">'
  for i = 58, 59 do out[#out + 1] = reg_xml(REGS[i]) end
  out[#out + 1] = "</feature></target>"
  return table.concat(out)
end)()

local Stub = {}
Stub.__index = Stub

--- A stub for one vCPU or several (gdb's threads).
-- @tparam kvm.vcpu|{kvm.vcpu,...} cpu a vCPU, or a list of the vCPUs of
--   one VM (the first is gdb's current thread at the start)
-- @tparam table opts `listen` = "HOST:PORT" (an IPv4 address; port 0 picks
--   a free one: `stub.port`) or a listening `kvm.socket`; `sw_breakpoints` =
--   "int3" or "hw" (gdb's Z0 in a debug register; default "hw" on kvm_pvm,
--   which does not intercept int3, else "int3"); `slice` = seconds the guest
--   runs between looks at the socket (0.05); `log` = function(message)
-- @treturn table the stub
-- @return[2] fail, message, errno (the address cannot be listened on)
function M.new(cpu, opts)
  opts = opts or {}
  local cpus = type(cpu) == "table" and cpu or { cpu }
  if #cpus == 0 then error("bad argument #1 to 'new' (kvm.vcpu or a list of them expected)", 2) end
  local dbgs, by_id = {}, {}
  for i, c in ipairs(cpus) do
    if type(c) ~= "userdata" or not tostring(c):match("^kvm%.vcpu %d") then
      error("bad argument #1 to 'new' (kvm.vcpu expected)", 2)
    end
    if by_id[c.id] then error("bad argument #1 to 'new' (vCPU " .. c.id .. " listed twice)", 2) end
    if c.vm ~= cpus[1].vm then error("bad argument #1 to 'new' (vCPUs of different VMs)", 2) end
    by_id[c.id] = i
    dbgs[i] = kdebug.new(c)
  end
  local listener = opts.listen
  if type(listener) == "string" then
    local host, port = listener:match("^([^:]*):(%d+)$")
    port = math.tointeger(tonumber(port))
    if not host or port > 65535 or not (host == "" or host == "localhost" or host:match("^%d+%.%d+%.%d+%.%d+$")) then
      error("bad option 'listen' to 'new' (\"HOST:PORT\" expected, HOST an IPv4 address)", 2)
    end
    local err, errno
    listener, err, errno = kvm.tcp_listen(host == "" and "127.0.0.1" or host, port)
    if not listener then return nil, err, errno end
  elseif listener == nil or not tostring(listener):match("^kvm%.socket") then
    error("bad option 'listen' to 'new' (\"HOST:PORT\" or a kvm.socket expected)", 2)
  end
  local swbp = opts.sw_breakpoints
  if swbp == nil then swbp = kvm.host_info().module == "kvm_pvm" and "hw" or "int3" end
  if swbp ~= "int3" and swbp ~= "hw" then
    error("bad option 'sw_breakpoints' to 'new' (\"int3\" or \"hw\" expected)", 2)
  end
  if opts.slice ~= nil and (type(opts.slice) ~= "number" or not (opts.slice > 0 and opts.slice <= 10)) then
    error("bad option 'slice' to 'new' (seconds from 0 to 10 expected)", 2)
  end
  local self = setmetatable({
    cpus = cpus, dbgs = dbgs, by_id = by_id, cur = 1, step_cpu = nil,
    cpu = cpus[1], vm = cpus[1].vm, dbg = dbgs[1], listener = listener, port = listener:port(),
    swbp = swbp, slice = opts.slice or 0.05, log = opts.log or function() end,
    inbuf = "", queue = {}, points = {}, features = {}, signal = SIGTRAP, last = nil,
    stats = { packets = 0, bad_checksum = 0, errors = 0, unsupported = 0 },
  }, Stub)
  return self
end

--- Wait for gdb to connect (a client already connected is dropped first).
-- @tparam[opt] number timeout seconds (nil: for as long as it takes)
-- @treturn true
-- @return[2] fail, "timeout"
function Stub:accept(timeout)
  self:drop()
  local c, err, errno = self.listener:accept(timeout)
  if not c then return nil, err, errno end
  self.conn, self.inbuf, self.queue, self.skipping = c, "", {}, false
  self.log("gdb connected")
  return true
end

-- the client is gone (or detached): its breakpoints go, the guest runs on
function Stub:drop()
  if self.conn then
    self.conn:close()
    self.conn = nil
    self.log("gdb disconnected")
  end
  for key in pairs(self.points) do
    self:remove_point(self.points[key])
    self.points[key] = nil
  end
  self.inbuf, self.queue, self.skipping = "", {}, false
end

--- Close the connection and the listening socket.
function Stub:close()
  self:drop()
  self.listener:close()
end

function Stub:send_raw(s)
  if not self.conn then return false end
  local ok = self.conn:send(s, 10)
  if not ok then self:drop() end
  return ok
end

function Stub:reply(data)
  return self:send_raw(M.frame(data))
end

-- The next event of what arrived: {"packet", data}, {"interrupt"}, {"bad"}
-- (checksum: answered "-"), {"oversize"}, or nil for none yet; acks and
-- stray bytes are dropped, the rest stays in inbuf for the next call.
function Stub:next_event()
  if #self.queue > 0 then return table.remove(self.queue, 1) end
  local buf = self.inbuf
  while #buf > 0 do
    local c = buf:sub(1, 1)
    if self.skipping then                   -- the rest of an oversize packet
      local hash = buf:find("#", 1, true)
      if not hash or #buf < hash + 2 then
        self.inbuf = hash and buf:sub(hash) or ""
        return nil
      end
      buf = buf:sub(hash + 3)
      self.skipping = false
    elseif c == "\3" then
      self.inbuf = buf:sub(2)
      return { "interrupt" }
    elseif c == "$" then
      local hash = buf:find("#", 2, true)
      if not hash then
        if #buf > M.PACKET_SIZE + 1 then      -- no end in sight: throw it away
          self.skipping = true
          self.inbuf = ""
          return { "oversize" }
        end
        break
      end
      if #buf < hash + 2 then break end
      local data, cs = buf:sub(2, hash - 1), buf:sub(hash + 1, hash + 2)
      self.inbuf = buf:sub(hash + 3)
      if #data > M.PACKET_SIZE then return { "oversize" } end
      if not cs:match("^%x%x$") or tonumber(cs, 16) ~= M.checksum(data) then return { "bad" } end
      data = data:gsub("}(.)", function(x) return string.char(x:byte() ~ 0x20) end)
      return { "packet", data }
    else                                      -- "+", "-", or noise: on to the next $ or ^C
      local nxt = buf:find("[%$\3]", 2)
      buf = nxt and buf:sub(nxt) or ""
    end
  end
  self.inbuf = buf
  return nil
end

-- receive into inbuf; false when the client went away
function Stub:fill(timeout)
  local s, err = self.conn:recv(65536, timeout)
  if s then
    if #self.inbuf + #s > 4 * M.PACKET_SIZE then   -- a flood without packets: dropped, E01 once
      if not self.skipping then self.queue[#self.queue + 1] = { "oversize" } end
      self.inbuf = ""
      self.skipping = true
    end
    self.inbuf = self.inbuf .. s
    return true
  end
  if err == "timeout" then return true end
  self:drop()
  return false
end

-- ---- registers ----

function Stub:state()
  local r = assert(self.cpu:regs())
  local s = assert(self.cpu:sregs())
  local f = self.cpu:fpu() or { fpr = {}, xmm = {} }
  return r, s, f
end

local function reg_bytes(reg, r, s, f)
  local v
  if reg.from == "r" then v = r[reg.field]
  elseif reg.from == "s" then v = s[reg.field].selector
  elseif reg.from == "b" then v = s[reg.field].base
  elseif reg.from == "f" then v = reg.field and f[reg.field] or 0
  elseif reg.from == "st" then return (f.fpr[reg.index] or ("\0"):rep(16)):sub(1, 10)
  else return f.xmm[reg.index] or ("\0"):rep(16) end
  return string.pack("<i8", v or 0):sub(1, reg.size)
end

function Stub:read_regs()
  local r, s, f = self:state()
  local out = {}
  for i, reg in ipairs(REGS) do out[i] = reg_bytes(reg, r, s, f) end
  return tohex(table.concat(out))
end

-- set register n (1-based) from its bytes: the general registers, rip and
-- eflags; the others cannot be written here (false)
function Stub:write_reg(n, bytes, regs)
  local reg = REGS[n]
  if not reg or #bytes ~= reg.size then return false end
  if reg.from ~= "r" then return false end
  local v = string.unpack(reg.size == 8 and "<i8" or "<I4", bytes)
  if regs then regs[reg.field] = v return true end
  return self.cpu:set_regs{ [reg.field] = v } == true
end

-- ---- memory ----

-- each page of [addr, addr + len) through the page tables: fn(gpa, offset, n)
function Stub:pages(addr, len, fn)
  local off = 0
  while off < len do
    local a = addr + off
    local n = math.min(len - off, 0x1000 - (a & 0xfff))
    local gpa = self.cpu:translate(a)
    if not gpa then return false end
    if not fn(gpa, off, n) then return false end
    off = off + n
  end
  return true
end

function Stub:read_mem(addr, len)
  local parts = {}
  local ok = self:pages(addr, len, function(gpa, _, n)
    local okr, s = pcall(self.vm.read, self.vm, gpa, n)
    parts[#parts + 1] = okr and s or nil
    return okr
  end)
  if not ok and #parts == 0 then return nil end
  return table.concat(parts)        -- a partial read is fine for gdb
end

function Stub:write_mem(addr, bytes)
  -- every page first: all or nothing
  local gpas = {}
  if not self:pages(addr, #bytes, function(gpa, off, n)
    gpas[#gpas + 1] = { gpa, off, n }
    return pcall(self.vm.read, self.vm, gpa, n)
  end) then return false end
  for _, p in ipairs(gpas) do self.vm:write(p[1], bytes:sub(p[2] + 1, p[2] + p[3])) end
  return true
end

-- ---- breakpoints ----

local ZTYPES = { ["0"] = "sw", ["1"] = "hw", ["2"] = "write", ["4"] = "access" }

-- a point is the ids of its breakpoint in each vCPU's Debugger (dbgs order);
-- the others first, so that the first one's int3 goes last
function Stub:remove_point(ids)
  for i = #self.dbgs, 1, -1 do
    if ids[i] then self.dbgs[i]:remove(ids[i]) end
  end
end

function Stub:breakpoint(insert, ztype, addr, kind)
  local t = ZTYPES[ztype]
  if not t then return "" end                   -- Z3 (read watchpoints): not on x86
  local key = ztype .. ":" .. addr .. ":" .. kind
  if not insert then
    local ids = self.points[key]
    if ids then self:remove_point(ids) self.points[key] = nil end
    return "OK"
  end
  if self.points[key] then return "OK" end
  local ids = {}
  if t == "sw" or t == "hw" then
    if self.dbgs[1]:at(addr) then return "E22" end   -- one at that address already (Z0 and Z1)
    local bptype = (t == "sw" and self.swbp == "int3") and "sw" or "hw"
    ids[1] = self.dbgs[1]:break_at(addr, nil, { type = bptype })
    local first = ids[1] and self.dbgs[1].bps[ids[1]]
    for i = 2, #self.dbgs do
      if not ids[i - 1] then break end
      if bptype == "sw" then                    -- the same int3: every vCPU intercepts it
        ids[i] = self.dbgs[i]:add{ type = "sw", addr = addr, kind = "exec", len = 1, shared = true,
                                   gpa = first.gpa, orig = first.orig }
      else
        ids[i] = self.dbgs[i]:break_at(addr, nil, { type = "hw" })
      end
    end
  else
    if kind ~= 1 and kind ~= 2 and kind ~= 4 and kind ~= 8 or addr & (kind - 1) ~= 0 then return "E22" end
    for i, d in ipairs(self.dbgs) do
      ids[i] = d:watch(addr, kind, nil, { kind = t })
      if not ids[i] then break end
    end
  end
  if not ids[#self.dbgs] then                      -- no debug register free, not mapped
    self:remove_point(ids)
    return "E28"
  end
  self.points[key] = ids
  return "OK"
end

-- ---- threads (a vCPU each: thread id = vCPU id + 1) ----

-- the index (in cpus) of thread id `s` (hex); "0" (any) and "-1" (all) are
-- the current one; nil: no such thread, or not a thread id
function Stub:thread(s)
  if s == "0" or s == "-1" then return self.cur end
  local tid = hexnum(s)
  return tid and self.by_id[tid - 1]
end

-- vCPU i becomes the current one (g, p, m... act on it)
function Stub:select(i)
  self.cur, self.cpu, self.dbg = i, self.cpus[i], self.dbgs[i]
end

function Stub:tid(i)
  return self.cpus[i or self.cur].id + 1
end

-- ---- stop replies ----

-- the stop reply for a "debug" exit (or a signal)
function Stub:stop_reply(e)
  local extra = ""
  if e and e.reason == "debug" then
    if e.exception == 3 and self.features.swbreak then
      extra = "swbreak:;"
    elseif e.slot then
      local bp = self.dbg.slots[e.slot]
      if bp and bp.type == "watch" then
        extra = fmt("%s:%x;", bp.kind == "write" and "watch" or "awatch", bp.addr)
      elseif bp and self.features.hwbreak then
        extra = "hwbreak:;"
      end
    end
  end
  return fmt("T%02xthread:%x;%s", self.signal, self:tid(), extra)
end

-- ---- packets ----

-- resume the guest from a stop: step over a breakpoint at the current
-- instruction first (the guest executes it, as gdb expects)
function Stub:step_over()
  if #self.dbgs == 1 then
    if self.dbg:at(self.dbg:pc()) then return self.dbg:step() end
    return
  end
  for _, d in ipairs(self.dbgs) do      -- every vCPU sitting on one
    if d:at(d:pc()) then d:step{ timeout = 1 } end
  end
end

-- one packet while stopped: the reply (nil: none), and "continue", "detach"
-- or "kill" when the guest leaves the stop
function Stub:packet(p)
  self.stats.packets = self.stats.packets + 1
  local c = p:sub(1, 1)
  if c == "?" then
    return self:stop_reply(self.last)
  elseif c == "g" and #p == 1 then
    return self:read_regs()
  elseif c == "G" then
    local bytes = fromhex(p:sub(2))
    if not bytes then return "E01" end
    local regs, at = {}, 1
    for n, reg in ipairs(REGS) do
      if at + reg.size - 1 > #bytes then break end
      if reg.from == "r" then self:write_reg(n, bytes:sub(at, at + reg.size - 1), regs) end
      at = at + reg.size
    end
    if next(regs) == nil then return "E01" end
    return self.cpu:set_regs(regs) and "OK" or "E01"
  elseif c == "p" then
    local n = hexnum(p:sub(2))
    if not n or n < 0 or n >= #REGS then return "E01" end
    local r, s, f = self:state()
    return tohex(reg_bytes(REGS[n + 1], r, s, f))
  elseif c == "P" then
    local n, v = p:match("^P(%x+)=(%x*)$")
    n = hexnum(n)
    local bytes = v and fromhex(v)
    if not n or not bytes or n >= #REGS then return "E01" end
    return self:write_reg(n + 1, bytes) and "OK" or "E01"
  elseif c == "m" then
    local a, l = p:match("^m(%x+),(%x+)$")
    a, l = hexnum(a), hexnum(l)
    if not a or not l then return "E01" end
    if l == 0 then return "" end
    if l < 0 or l > (M.PACKET_SIZE - 4) // 2 then l = (M.PACKET_SIZE - 4) // 2 end
    local s = self:read_mem(a, l)
    return s and tohex(s) or "E14"
  elseif c == "M" then
    local a, l, h = p:match("^M(%x+),(%x+):(%x*)$")
    a, l = hexnum(a), hexnum(l)
    local bytes = h and fromhex(h)
    if not a or not l or not bytes or #bytes ~= l then return "E01" end
    return self:write_mem(a, bytes) and "OK" or "E14"
  elseif c == "c" or c == "C" then
    local addr = p:match("^c(.+)$") or p:match("^C%x+;(.*)$")
    if addr and not hexnum(addr) then return "E01" end
    if addr then self.cpu:set_regs{ rip = hexnum(addr) } end
    return nil, "continue"
  elseif c == "s" or c == "S" then
    local addr = p:match("^s(.+)$") or p:match("^S%x+;(.*)$")
    if addr and not hexnum(addr) then return "E01" end
    local sc = self.cpus[self.step_cpu or self.cur]
    if addr then sc:set_regs{ rip = hexnum(addr) } end
    return nil, "step"
  elseif c == "Z" or c == "z" then
    local t, a, k = p:match("^[Zz](%d),(%x+),(%x+)")
    a, k = hexnum(a), hexnum(k)
    if not t or not a or not k then return "E01" end
    return self:breakpoint(c == "Z", t, a, k)
  elseif c == "H" then
    local op, t = p:match("^H(.)(.*)$")
    local i = op and self:thread(t)
    if not i then return "E01" end
    if op == "g" then self:select(i) elseif op == "c" then self.step_cpu = i end
    return "OK"
  elseif c == "T" then
    return self:thread(p:sub(2)) and "OK" or "E01"
  elseif c == "D" then
    return "OK", "detach"
  elseif c == "k" then
    return nil, "kill"
  elseif p == "vCont?" then
    return "vCont;c;C;s;S"
  elseif p:match("^vCont;") then
    -- actions: c, C sig, s, S sig, each for a thread (:TID) or all; a step
    -- of one thread steps it alone (all-stop: the others stay stopped)
    local step
    for a in (p:sub(7) .. ";"):gmatch("([^;]*);") do
      local action, t = a:match("^([cs])(.*)$")
      if not action then action, t = a:match("^([CS])%x%x(.*)$") end
      if not action then return "E01" end
      local i = self.cur
      if t ~= "" then
        i = t:match("^:") and self:thread(t:sub(2))
        if not i then return "E01" end
      end
      if (action == "s" or action == "S") and not step then step = i end
    end
    if step then self.step_cpu = step return nil, "step" end
    return nil, "continue"
  elseif p == "vMustReplyEmpty" then
    return ""
  elseif p:match("^qSupported") then
    self.features = {}
    for f in (p:match("^qSupported:(.*)$") or ""):gmatch("([^;]+)") do
      local name = f:match("^(.-)%+$")
      if name then self.features[name] = true end
    end
    return fmt("PacketSize=%x;qXfer:features:read+;vContSupported+%s%s", M.PACKET_SIZE,
               self.features.swbreak and ";swbreak+" or "", self.features.hwbreak and ";hwbreak+" or "")
  elseif p:match("^qXfer:features:read:") then
    local annex, off, len = p:match("^qXfer:features:read:([^:]*):(%x+),(%x+)$")
    off, len = hexnum(off), hexnum(len)
    if not annex or not off or not len or off < 0 or len < 0 then return "E01" end
    if annex ~= "target.xml" then return "E00" end
    len = math.min(len, M.PACKET_SIZE - 8)
    local chunk = M.TARGET_XML:sub(off + 1, off + len)
    return (off + len >= #M.TARGET_XML and "l" or "m") .. chunk
  elseif p == "qAttached" then
    return "1"
  elseif p == "qC" then
    return fmt("QC%x", self:tid())
  elseif p == "qfThreadInfo" then
    local ids = {}
    for i in ipairs(self.cpus) do ids[i] = fmt("%x", self:tid(i)) end
    return "m" .. table.concat(ids, ",")
  elseif p == "qsThreadInfo" then
    return "l"
  elseif p:match("^qThreadExtraInfo,") then
    local i = self:thread(p:sub(18))
    if not i then return "E01" end
    return tohex("vCPU " .. self.cpus[i].id)
  elseif p == "qSymbol::" then
    return "OK"
  end
  self.stats.unsupported = self.stats.unsupported + 1
  return ""
end

-- ---- the loops ----

--- The guest has stopped (a "debug" exit `e`, or `nil` for an interrupt or
-- the start): tell gdb, and serve it until it resumes the guest. A single
-- step is made here (and reported) without returning. The vCPU `e.cpu`
-- names (one of the stub's) becomes gdb's current thread; on "continue",
-- every vCPU sitting on a breakpoint is first stepped over it.
-- @param[opt] e the exit
-- @tparam[opt=5] integer signal what gdb is told (5 SIGTRAP, 2 SIGINT)
-- @tparam[opt] boolean quiet do not send the stop reply (gdb asks with "?" when it connects)
-- @treturn string "continue" (run the guest), "detach" (gdb left: run it
--   without breakpoints) or "kill"
function Stub:stopped(e, signal, quiet)
  self.last, self.signal = e, signal or SIGTRAP
  -- the vCPU that stopped becomes gdb's current thread
  local si = e and math.type(e.cpu) == "integer" and self.by_id[e.cpu]
  if si then self:select(si) end
  self.step_cpu = nil
  if not self.conn then return "detach" end
  if not quiet then self:reply(self:stop_reply(e)) end
  while self.conn do
    local ev = self:next_event()
    if not ev then
      if not self:fill(nil) then break end
    elseif ev[1] == "bad" then
      self.stats.bad_checksum = self.stats.bad_checksum + 1
      self:send_raw("-")
    elseif ev[1] == "oversize" then
      self.stats.errors = self.stats.errors + 1
      self:send_raw("+")
      self:reply("E01")
    elseif ev[1] == "packet" then
      self:send_raw("+")
      local ok, r, action = pcall(self.packet, self, ev[2])
      if not ok then                  -- a bug of ours, or the vCPU refused: E, and go on
        self.stats.errors = self.stats.errors + 1
        self.log("packet " .. ev[2]:sub(1, 40) .. ": " .. tostring(r))
        r, action = "E01", nil
      end
      if r then self:reply(r) end
      if action == "step" then
        local i = self.step_cpu or self.cur
        self:select(i)
        local se = self.dbg:step{ timeout = 5 }
        self.last, self.signal, self.step_cpu = se, SIGTRAP, nil
        self:reply(self:stop_reply(se))
      elseif action == "continue" then
        self:step_over()
        return "continue"
      elseif action == "detach" or action == "kill" then
        self:drop()
        return action
      end
    end                               -- "interrupt" while stopped: nothing to do
  end
  return "detach"
end

--- While the guest runs, between two runs: a client that connected (gdb
-- expects to find the guest stopped) or a Ctrl-C from the client.
-- @treturn ?string "connected" or "interrupt": stop the guest and call
--   `stub:stopped(nil, 5, true)` for a new client (it asks why with "?"),
--   `stub:stopped(nil, 2)` for Ctrl-C; nil: let it run
function Stub:poll()
  if not self.conn then
    local c = self.listener:accept(0)
    if c then
      self.conn, self.inbuf, self.queue, self.skipping = c, "", {}, false
      self.log("gdb connected")
      return "connected"
    end
    return nil
  end
  if not self:fill(0) then return nil end
  local ev = self:next_event()
  if not ev then return nil end
  -- a packet while the guest runs (all-stop gdb sends none): the guest
  -- stops, and the packet is served then
  if ev[1] ~= "interrupt" then self.queue[#self.queue + 1] = ev end
  return "interrupt"
end

-- one slice of the run: the one vCPU (its Debugger's run), or every vCPU
-- (vm:run: each on a thread, the first to stop ends it)
function Stub:run_slice(run_opts)
  if #self.cpus == 1 then return self.dbg:run(run_opts) end
  run_opts.cpus = self.cpus
  local e, err, errno = self.vm:run(run_opts)
  if e and e.reason == "debug" then
    local i = self.by_id[e.cpu]
    if i then self.dbgs[i]:which(e) end   -- an int3: RIP back onto it
  end
  return e, err, errno
end

--- Run the guest under gdb until it ends (an exit nothing handles: gdb is
-- told the guest exited) or gdb kills it. Call `accept` first to start
-- stopped (gdb's first look at the guest before any instruction runs).
-- @tparam[opt] table opts run()'s options (`unclaimed`...) and `timeout`:
--   seconds for the whole run
-- @treturn kvm.exit|string the exit that ended the guest, or "killed", or
--   the "timeout" exit
function Stub:run(opts)
  opts = opts or {}
  local deadline = opts.timeout and kvm.now() + opts.timeout
  local run_opts = {}
  for k, v in pairs(opts) do run_opts[k] = v end
  local state = self.conn and "stopped" or "running"
  local first = true
  while true do
    if state == "stopped" then
      local r = self:stopped(nil, SIGTRAP, first)
      first = false
      if r == "kill" then return "killed" end
      state = "running"
    end
    local slice = self.slice
    if deadline then
      local left = deadline - kvm.now()
      if left <= 0 then left = 0.001 end
      if left < slice then slice = left end
    end
    run_opts.timeout = slice
    local e, err, errno = self:run_slice(run_opts)
    if not e then return nil, err, errno end
    if e.reason == "timeout" then
      if deadline and kvm.now() >= deadline then return e end
      local p = self:poll()
      if p == "connected" then
        state, first = "stopped", true
        self.last, self.signal = nil, SIGTRAP
      elseif p == "interrupt" then
        local r = self:stopped(nil, SIGINT)
        if r == "kill" then return "killed" end
      end
    elseif e.reason == "debug" and self.conn then
      local r = self:stopped(e, SIGTRAP)
      if r == "kill" then return "killed" end
    else
      if self.conn then
        self:reply("W00")
        self:drop()
      end
      return e
    end
  end
end

return M
