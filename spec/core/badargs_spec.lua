--- A badargs sweep over every method of kvm.vm, kvm.memory, kvm.vcpu and
-- kvm.exit: each argument in turn is replaced by nil, "x", {}, 1.5, -1 and
-- math.maxinteger; the call must raise a Lua error (or, where the value is
-- legitimately accepted, return) and never take the process down. Then every
-- method of a closed object raises "attempt to use a closed ...".
--
-- Every call gets fresh objects so that one call's side effects (a claim, a
-- region) cannot change another's outcome.
local support = require "support"
local kvm = require "kvm"

local BAD = {
  { "nil", nil }, { "string", "x" }, { "table", {} }, { "float", 1.5 },
  { "negative", -1 }, { "maxinteger", math.maxinteger },
}

local IN1 = "\xe4\x10"             -- in al, 0x10
         .. "\xf4"                 -- hlt

-- name = { template arguments, accepts = { [position] = "labels accepted" } }
-- (a value is "accepted" when the call may return normally with it, e.g. a
-- number where Lua converts it to a string, or a nil that selects a default)
local VM = {
  memory = { { { guest = 0x100000, size = 0x1000 } } },
  -- the sweep's VM has no open vCPU: every call raises, good arguments too
  run = { { { max_exits = 1 } } },
  vcpu = { { 1 } },
  read = { { 0, 4 } },
  write = { { 0, "ab" }, accepts = { [2] = "string float negative maxinteger" } },
  u8 = { { 0, 1 }, accepts = { [2] = "nil negative" } },
  u16 = { { 0, 1 }, accepts = { [2] = "nil negative" } },
  u32 = { { 0, 1 }, accepts = { [2] = "nil negative" } },
  u64 = { { 0, 1 }, accepts = { [2] = "nil negative maxinteger" } },
  tss_addr = { { 0xfffbd000 } },
  identity_map_addr = { { 0xfffbc000 } },
  irq_line = { { 4, 1 } },
  on_io = { { 0x10, print } },
  -- a range at 2^63-1 or 2^63-1 bytes long is not refused: it is no RAM
  on_mmio = { { 0x10000000, 0x1000, print }, accepts = { [1] = "maxinteger", [2] = "maxinteger" } },
  debug_exit = { { 0x501 }, accepts = { [1] = "nil" } },
  serial = { { { output = false } }, accepts = { [1] = "nil table" } },
  legacy_ports = { { {} }, accepts = { [1] = "nil table" } },
  power = { { {} }, accepts = { [1] = "nil table" } },
  debugcon = { { { output = false } }, accepts = { [1] = "nil table" } },
  -- a missing image is nil + msg
  virtio_blk = { { { path = "/nonexistent" } } },
  virtio_rng = { { {} }, accepts = { [1] = "nil table" } },
  virtio_console = { { { output = false } }, accepts = { [1] = "nil table" } },
  -- a path that is a number is a string to Lua: a missing file, nil + msg
  load_elf = { { "/nonexistent", {} }, accepts = { [1] = "string float negative maxinteger", [2] = "nil table" } },
  -- a snapshot of another VM (filled in by the spec): it does not fit, nil + msg
  restore = { { "SNAP" } },
}
local VM_NOARGS = { close = true, irqchip = true, pit = true, claims = true, stats = true,
                    regions = true, boot_markers = true, snapshot = true }

local MEMORY = {
  read = { { 0, 4 } },
  write = { { 0, "ab" }, accepts = { [2] = "string float negative maxinteger" } },
  fill = { { 0, 4, 0 } },
  -- the path (a temporary file) is filled in by the spec; a missing file, an
  -- offset past the end, a file that does not fit or a length too long are
  -- nil + msg; a length of -1 means "to the end"
  load = { { 0, "PATH", 0, 1 }, accepts = { [1] = "maxinteger", [2] = "string float negative maxinteger",
                                             [3] = "nil maxinteger", [4] = "nil negative maxinteger" } },
  u8 = { { 0, 1 }, accepts = { [2] = "nil negative" } },
  u16 = { { 0, 1 }, accepts = { [2] = "nil negative" } },
  u32 = { { 0, 1 }, accepts = { [2] = "nil negative" } },
  u64 = { { 0, 1 }, accepts = { [2] = "nil negative maxinteger" } },
}
local MEMORY_NOARGS = { close = true, dirty_pages = true }

local VCPU = {
  set_regs = { { { rax = 1 } }, accepts = { [1] = "table" } },
  set_sregs = { { { cr8 = 0 } }, accepts = { [1] = "table" } },
  set_cpuid = { { {} }, accepts = { [1] = "table" } },
  msrs = { { { 0x174 } }, accepts = { [1] = "table" } },
  set_msrs = { { { [0x174] = 0 } }, accepts = { [1] = "table" } },
  set_events = { { {} }, accepts = { [1] = "table" } },
  set_fpu = { { { fcw = 0x37f } }, accepts = { [1] = "table" } },
  translate = { { 0x1000 }, accepts = { [1] = "negative maxinteger" } },
  run = { { { max_exits = 1 } }, accepts = { [1] = "nil table" } },
  step = { { { max_exits = 1 } }, accepts = { [1] = "nil table" } },
  -- nil and {} turn guest debugging off
  set_guest_debug = { { { singlestep = true } }, accepts = { [1] = "nil table" } },
}
local VCPU_NOARGS = { close = true, regs = true, sregs = true, events = true, stop = true, stats = true,
                      fpu = true, guest_debug = true }

local EXIT = {
  -- the exit is a 1-byte "in": "x" is one raw byte
  reply = { { 1 }, accepts = { [1] = "string negative maxinteger" } },
}
local EXIT_NOARGS = { fields = true }

local function accepted(spec, pos, label)
  local a = spec.accepts and spec.accepts[pos]
  return a ~= nil and (" " .. a .. " "):find(" " .. label .. " ", 1, true) ~= nil
end

-- the method names of an object: its metatable's __index table or "methods"
local function methods_of(obj)
  local mt = getmetatable(obj)
  local t = type(mt.__index) == "table" and mt.__index or mt.methods
  local names = {}
  for k in pairs(t) do names[#names + 1] = k end
  table.sort(names)
  return names
end

describe("badargs", function()
  local path
  setup(function()
    path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write("0123456789abcdef")
    f:close()
  end)
  teardown(function() os.remove(path) end)

  -- the placeholders of a template: "PATH" a file, "SNAP" a snapshot of another VM
  local snap
  local function subst(a)
    if a == "PATH" then return path end
    if a == "SNAP" then
      if not snap then
        local other = assert(kvm.vm())
        other:memory{ guest = 0, size = 0x10000 }
        snap = assert(other:snapshot())
        other:close()
      end
      return snap
    end
    return a
  end

  -- fresh objects for one call: vm, memory, vcpu, and an "in" exit
  local function fresh(kind)
    local vm, cpu, ram = support.guest(IN1)
    if kind == "vm" then cpu:close() return vm end
    if kind == "memory" then cpu:close() return ram, vm end
    if kind == "vcpu" then return cpu, vm end
    local e = cpu:run()
    assert(e.reason == "io" and e.direction == "in")
    return e, vm
  end

  local sweeps = {
    { "kvm.vm", "vm", VM, VM_NOARGS },
    { "kvm.memory", "memory", MEMORY, MEMORY_NOARGS },
    { "kvm.vcpu", "vcpu", VCPU, VCPU_NOARGS },
    { "kvm.exit", "exit", EXIT, EXIT_NOARGS },
  }

  for _, s in ipairs(sweeps) do
    local tname, kind, table_, noargs = s[1], s[2], s[3], s[4]

    it(tname .. ": the sweep covers every method", function()
      support.need_kvm()
      local obj = fresh(kind)
      for _, name in ipairs(methods_of(obj)) do
        assert.is_true(table_[name] ~= nil or noargs[name] ~= nil, tname .. ":" .. name .. " is not swept")
      end
    end)

    local names = {}
    for name in pairs(table_) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
      local spec = table_[name]
      it(("%s:%s with bad arguments raises, never crashes"):format(tname, name), function()
        support.need_kvm()
        local template = spec[1]
        local n = #template
        local surprises = {}
        for pos = 1, n do
          for _, b in ipairs(BAD) do
            local label, value = b[1], b[2]
            local args = {}
            for i = 1, n do args[i] = subst(template[i]) end
            args[pos] = value
            local obj, vm = fresh(kind)
            local okc, e = pcall(function() return obj[name](obj, table.unpack(args, 1, n)) end)
            local want_ok = accepted(spec, pos, label)
            if okc ~= want_ok then
              surprises[#surprises + 1] = ("#%d = %s: %s"):format(pos, label,
                okc and "returned" or ("raised " .. tostring(e)))
            elseif not okc then
              assert.equal("string", type(e))
            end
            if vm then vm:close() end
            obj = nil
          end
        end
        assert.same({}, surprises)
      end)
    end
  end

  describe("closed objects", function()
    local closers = {
      { "kvm.vm", "vm", VM, function(o) o:close() end },
      { "kvm.memory", "memory", MEMORY, function(o) o:close() end },
      { "kvm.vcpu", "vcpu", VCPU, function(o) o:close() end },
    }
    -- boot_markers stays readable after close (documented in csrc/legacy.c)
    local readable = { boot_markers = true }
    for _, c in ipairs(closers) do
      local tname, kind, table_, close = c[1], c[2], c[3], c[4]
      it("every method of a closed " .. tname .. " raises 'attempt to use a closed " .. tname .. "'", function()
        support.need_kvm()
        local names = methods_of(fresh(kind))
        local wrong = {}
        for _, name in ipairs(names) do
          local obj, vm = fresh(kind)
          close(obj)
          local args = {}
          for i, a in ipairs(table_[name] and table_[name][1] or {}) do args[i] = subst(a) end
          local okc, e = pcall(function() return obj[name](obj, table.unpack(args)) end)
          if name == "close" or readable[name] then
            if not okc then wrong[#wrong + 1] = name .. " raised " .. tostring(e) end
          elseif okc or not tostring(e):find("attempt to use a closed " .. tname, 1, true) then
            wrong[#wrong + 1] = name .. (okc and " returned" or (" raised " .. tostring(e)))
          end
          if vm then vm:close() end
        end
        assert.same({}, wrong)
      end)
    end

    it("an exit of a closed vCPU: reply raises, fields and tostring work", function()
      support.need_kvm()
      local vm, cpu = support.guest(IN1)
      local x = cpu:run()
      cpu:close()
      assert.equal("attempt to use a closed kvm.vcpu", support.err(function() x:reply(1) end))
      assert.equal("io", x:fields().reason)
      assert.equal("io in port=0x10 size=1 count=1", tostring(x))
      vm:close()
    end)
  end)

  it("methods called on the wrong type of object raise, naming the type", function()
    support.need_kvm()
    local vm, cpu, ram = support.guest(IN1)
    local vm_read = getmetatable(vm).__index.read
    local mem_read = getmetatable(ram).methods.read
    local cpu_regs = getmetatable(cpu).methods.regs
    assert.matches("kvm%.vm expected, got kvm%.memory", support.err(vm_read, ram, 0, 1))
    assert.matches("kvm%.memory expected, got kvm%.vm", support.err(mem_read, vm, 0, 1))
    assert.matches("kvm%.vcpu expected, got table", support.err(cpu_regs, {}))
    assert.matches("kvm%.vcpu expected, got no value", support.err(cpu_regs))
  end)
end)
