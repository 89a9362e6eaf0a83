-- kvm.x86: control-register bits, page tables, descriptors, and the mode helpers
-- (checked against fake vCPU/VM objects that record what they are given).
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path

local x86 = require "kvm.x86"

local GiB, MiB = 1 << 30, 1 << 20

local function u64(s, off) return (string.unpack("<I8", s, off + 1)) end

-- A fake VM recording vm:write and a fake vCPU recording set_sregs.
local function fakes()
  local vm = { writes = {} }
  function vm:write(gpa, bytes) self.writes[#self.writes + 1] = { gpa = gpa, bytes = bytes } end
  local cpu = { calls = {} }
  function cpu:set_sregs(t) self.calls[#self.calls + 1] = t end
  cpu.set_regs = function() error("set_regs must not be called") end
  return cpu, vm
end

local function written_at(vm, gpa)
  for _, w in ipairs(vm.writes) do if w.gpa == gpa then return w.bytes end end
end

describe("kvm.x86 constants", function()
  it("have the architectural values", function()
    assert.are.equal(1, x86.CR0_PE)
    assert.are.equal(2, x86.CR0_MP)
    assert.are.equal(4, x86.CR0_EM)
    assert.are.equal(8, x86.CR0_TS)
    assert.are.equal(0x10, x86.CR0_ET)
    assert.are.equal(0x20, x86.CR0_NE)
    assert.are.equal(0x10000, x86.CR0_WP)
    assert.are.equal(0x40000, x86.CR0_AM)
    assert.are.equal(0x20000000, x86.CR0_NW)
    assert.are.equal(0x40000000, x86.CR0_CD)
    assert.are.equal(0x80000000, x86.CR0_PG)
    assert.are.equal(0x10, x86.CR4_PSE)
    assert.are.equal(0x20, x86.CR4_PAE)
    assert.are.equal(0x80, x86.CR4_PGE)
    assert.are.equal(0x200, x86.CR4_OSFXSR)
    assert.are.equal(0x400, x86.CR4_OSXMMEXCPT)
    assert.are.equal(0x40000, x86.CR4_OSXSAVE)
    assert.are.equal(1, x86.EFER_SCE)
    assert.are.equal(0x100, x86.EFER_LME)
    assert.are.equal(0x400, x86.EFER_LMA)
    assert.are.equal(0x800, x86.EFER_NXE)
    assert.are.equal(1, x86.PTE_P)
    assert.are.equal(2, x86.PTE_RW)
    assert.are.equal(4, x86.PTE_US)
    assert.are.equal(0x80, x86.PTE_PS)
    assert.are.equal(2, x86.RFLAGS_RESERVED)
    assert.are.equal(0x200, x86.RFLAGS_IF)
    assert.are.equal(0x10, x86.CODE_SEL)
    assert.are.equal(0x18, x86.DATA_SEL)
  end)
end)

describe("kvm.x86.page_tables", function()
  it("identity-maps 4 GiB with 2 MiB pages by default", function()
    local bytes, info = x86.page_tables{ base = 0x10000 }
    assert.are.equal(6 * 4096, #bytes)
    assert.are.same({ pml4 = 0x10000, pdpt = 0x11000, pd = 0x12000, npd = 4,
      map_size = 4 * GiB, size = 6 * 4096 }, info)
    -- PML4[0] -> PDPT, the rest empty
    assert.are.equal(0x11003, u64(bytes, 0))
    assert.are.equal(0, u64(bytes, 8))
    assert.are.equal(string.rep("\0", 4096 - 8), bytes:sub(9, 4096))
    -- PDPT[0..3] -> the four PDs
    for i = 0, 3 do
      assert.are.equal((0x12000 + i * 0x1000) | 3, u64(bytes, 0x1000 + 8 * i))
    end
    assert.are.equal(0, u64(bytes, 0x1000 + 8 * 4))
    -- first PD entry maps 0 with a 2 MiB page
    assert.are.equal(0x83, u64(bytes, 0x2000))
    assert.are.equal(0x200083, u64(bytes, 0x2008))
    -- last entry of the last PD maps 4 GiB - 2 MiB
    assert.are.equal(0xffe00083, u64(bytes, 0x5ff8))
    -- exactly the first bytes, known
    assert.are.equal("\x03\x10\x01\x00\x00\x00\x00\x00", bytes:sub(1, 8))
    assert.are.equal("\x83\x00\x00\x00\x00\x00\x00\x00\x83\x00\x20\x00\x00\x00\x00\x00",
      bytes:sub(0x2001, 0x2010))
  end)

  it("maps every 2 MiB page of the range once and nothing beyond", function()
    local bytes = x86.page_tables{ base = 0, size = 3 * GiB + 4 * MiB }
    assert.are.equal((2 + 4) * 4096, #bytes)
    local n = 0
    for off = 0x2000, #bytes - 8, 8 do
      local e = u64(bytes, off)
      if e ~= 0 then
        assert.are.equal(n << 21 | 0x83, e)
        n = n + 1
      end
    end
    assert.are.equal((3 * GiB + 4 * MiB) >> 21, n)
  end)

  it("maps a partial last GiB", function()
    local bytes, info = x86.page_tables{ base = 0x9000, size = 2 * MiB }
    assert.are.equal(1, info.npd)
    assert.are.equal(0xb003, u64(bytes, 0x1000))
    assert.are.equal(0x83, u64(bytes, 0x2000))
    assert.are.equal(0, u64(bytes, 0x2008))
  end)

  it("uses 1 GiB pages with huge_1g", function()
    local bytes, info = x86.page_tables{ base = 0x10000, size = 4 * GiB, huge_1g = true }
    assert.are.equal(2 * 4096, #bytes)
    assert.is_nil(info.pd)
    assert.are.equal(0, info.npd)
    assert.are.equal(0x11003, u64(bytes, 0))
    assert.are.equal(0x83, u64(bytes, 0x1000))
    assert.are.equal(0x40000083, u64(bytes, 0x1008))
    assert.are.equal(0xc0000083, u64(bytes, 0x1018))
    assert.are.equal(0, u64(bytes, 0x1020))
  end)

  it("maps up to 512 GiB", function()
    local bytes, info = x86.page_tables{ base = 0, size = 512 * GiB, huge_1g = true }
    assert.are.equal(8192, #bytes)
    assert.are.equal(511 << 30 | 0x83, u64(bytes, 0x1ff8))
    assert.are.equal(512 * GiB, info.map_size)
  end)

  local bad = {
    { "nil options", nil, "page_tables: expected a table of options, got nil" },
    { "missing base", {}, "page_tables: base must be an integer, got nil" },
    { "float base", { base = 1.5 }, "page_tables: base must be an integer, got number" },
    { "unaligned base", { base = 0x1234 }, "page_tables: base 0x1234 is not 4 KiB aligned" },
    { "unknown option", { base = 0, sise = 1 }, "page_tables: unknown option 'sise'" },
    { "string size", { base = 0, size = "4G" }, "page_tables: size must be an integer, got string" },
    { "zero size", { base = 0, size = 0 }, "page_tables: size 0 must be positive" },
    { "negative size", { base = 0, size = -GiB }, "page_tables: size -1073741824 must be positive" },
    { "odd size", { base = 0, size = 0x1000 }, "page_tables: size 0x1000 is not a multiple of 2 MiB" },
    { "huge size", { base = 0, size = 513 * GiB }, "page_tables: size 0x8040000000 exceeds 512 GiB" },
    { "huge_1g odd size", { base = 0, size = 2 * MiB, huge_1g = true },
      "page_tables: size 0x200000 is not a multiple of 1 GiB (huge_1g)" },
    { "huge_1g not boolean", { base = 0, huge_1g = 1 }, "page_tables: huge_1g must be a boolean, got number" },
    { "base beyond 2^52", { base = (1 << 52) - 0x1000 },
      "page_tables: tables at 0xffffffffff000 (0x6000 bytes) end beyond 2^52" },
    { "negative base", { base = -4096 },
      "page_tables: tables at 0xfffffffffffff000 (0x6000 bytes) end beyond 2^52" },
  }
  for _, c in ipairs(bad) do
    it("raises on " .. c[1], function()
      assert.has_error(function() x86.page_tables(c[2]) end, c[3])
    end)
  end

  it("raises at the caller's level", function()
    local ok, err = pcall(function() x86.page_tables{ base = 1 } end)
    assert.is_false(ok)
    assert.matches("^spec/unit/x86_spec.lua:%d+: page_tables: base 0x1 is not 4 KiB aligned$", err)
  end)
end)

describe("kvm.x86.segment", function()
  it("encodes the flat 64-bit code descriptor", function()
    assert.are.equal(0x00af9b000000ffff,
      x86.segment{ base = 0, limit = 0xfffff, type = 0xb, s = 1, present = 1, l = 1, g = 1 })
  end)

  it("encodes the flat data descriptor", function()
    assert.are.equal(0x00cf93000000ffff,
      x86.segment{ type = 3, s = 1, present = 1, db = 1, g = 1, limit = 0xfffff })
  end)

  it("encodes the flat 32-bit code descriptor", function()
    assert.are.equal(0x00cf9b000000ffff, x86.segment(x86.FLAT_CODE32))
  end)

  it("splits base and limit across the descriptor", function()
    -- base 0x12345678, limit 0xabcde, type 2, dpl 3, avl 1
    assert.are.equal(0x121af2345678bcde,
      x86.segment{ base = 0x12345678, limit = 0xabcde, type = 2, s = 1, dpl = 3, present = 1, avl = 1 })
  end)

  it("encodes base bits 24-31 in the top byte (negative integer)", function()
    local d = x86.segment{ base = 0xff000000 }
    assert.are.equal(0xff00000000000000, d)
    assert.is_true(d < 0)
  end)

  it("accepts booleans for flags", function()
    assert.are.equal(0x00af9b000000ffff,
      x86.segment{ limit = 0xfffff, type = 0xb, s = true, present = true, l = true, g = true, db = false })
  end)

  it("is all zero for an empty table", function()
    assert.are.equal(0, x86.segment{})
  end)

  it("round-trips through decode_segment", function()
    local cases = {
      { base = 0, limit = 0xfffff, type = 0xb, s = 1, dpl = 0, present = 1, avl = 0, l = 1, db = 0, g = 1 },
      { base = 0xffffffff, limit = 0xfffff, type = 0xf, s = 1, dpl = 3, present = 1, avl = 1, l = 1, db = 1, g = 1 },
      { base = 0x12345678, limit = 0xabcde, type = 2, s = 0, dpl = 2, present = 0, avl = 1, l = 0, db = 1, g = 0 },
    }
    for _, t in ipairs(cases) do
      assert.are.same(t, x86.decode_segment(x86.segment(t)))
    end
    assert.are.equal(-1, x86.segment(x86.decode_segment(-1)))
    assert.are.equal(0x00cf93000000ffff, x86.segment(x86.decode_segment(0x00cf93000000ffff)))
  end)

  local bad = {
    { "a non-table", 42, "segment: expected a table, got number" },
    { "an unknown field", { bas = 0 }, "segment: unknown field 'bas'" },
    { "a selector (use sreg_segment)", { selector = 8 }, "segment: unknown field 'selector'" },
    { "a wide limit", { limit = 0x100000 }, "segment: field 'limit' = 0x100000 out of range (0..0xfffff)" },
    { "a wide base", { base = 0x100000000 }, "segment: field 'base' = 0x100000000 out of range (0..0xffffffff)" },
    { "a negative base", { base = -1 }, "segment: field 'base' = 0xffffffffffffffff out of range (0..0xffffffff)" },
    { "a wide type", { type = 16 }, "segment: field 'type' = 0x10 out of range (0..0xf)" },
    { "a wide dpl", { dpl = 4 }, "segment: field 'dpl' = 0x4 out of range (0..0x3)" },
    { "a flag of 2", { g = 2 }, "segment: field 'g' = 0x2 out of range (0..0x1)" },
    { "a float", { l = 1.0 }, "segment: field 'l' must be an integer, got float" },
    { "a string", { type = "code" }, "segment: field 'type' must be an integer, got string" },
    { "a boolean type", { type = true }, "segment: field 'type' must be an integer, got boolean" },
  }
  for _, c in ipairs(bad) do
    it("raises on " .. c[1], function()
      assert.has_error(function() x86.segment(c[2]) end, c[3])
    end)
  end

  it("decode_segment raises on a non-integer", function()
    assert.has_error(function() x86.decode_segment("x") end, "decode_segment: expected an integer, got string")
    assert.has_error(function() x86.decode_segment(1.5) end, "decode_segment: expected an integer, got float")
  end)
end)

describe("kvm.x86.sreg_segment", function()
  it("expands a page-granular limit to bytes", function()
    assert.are.same({ selector = 0x10, base = 0, limit = 0xffffffff, type = 0xb, s = 1, dpl = 0,
      present = 1, avl = 0, l = 1, db = 0, g = 1 }, x86.sreg_segment(x86.FLAT_CODE64, 0x10))
  end)
  it("keeps a byte-granular limit", function()
    assert.are.same({ selector = 0, base = 0x1000, limit = 0xffff, type = 3, s = 1, dpl = 0,
      present = 1, avl = 0, l = 0, db = 0, g = 0 },
      x86.sreg_segment{ base = 0x1000, limit = 0xffff, type = 3, s = 1, present = 1 })
  end)
  it("raises on a bad selector", function()
    assert.has_error(function() x86.sreg_segment({}, 0x10000) end,
      "sreg_segment: selector must be an integer 0..0xffff")
  end)
  it("raises on a bad field", function()
    assert.has_error(function() x86.sreg_segment{ foo = 1 } end, "sreg_segment: unknown field 'foo'")
  end)
end)

describe("kvm.x86.gdt", function()
  it("packs integers and tables, little-endian, in order", function()
    local b = x86.gdt{ 0, x86.FLAT_CODE64, 0x00cf93000000ffff }
    assert.are.equal(24, #b)
    assert.are.equal(string.rep("\0", 8)
      .. "\xff\xff\x00\x00\x00\x9b\xaf\x00"
      .. "\xff\xff\x00\x00\x00\x93\xcf\x00", b)
  end)
  it("does not add a null descriptor", function()
    assert.are.equal("\xff\xff\x00\x00\x00\x93\xcf\x00", x86.gdt{ x86.FLAT_DATA })
  end)
  it("packs a negative descriptor", function()
    assert.are.equal(string.rep("\xff", 8), x86.gdt{ -1 })
  end)
  it("raises on bad lists", function()
    assert.has_error(function() x86.gdt() end, "gdt: expected a list of descriptors, got nil")
    assert.has_error(function() x86.gdt{} end, "gdt: empty descriptor list")
    assert.has_error(function() x86.gdt{ 0, "x" } end, "gdt: entry 2 must be an integer or a table, got string")
    assert.has_error(function() x86.gdt{ 0, { type = 99 } } end,
      "gdt: entry 2: field 'type' = 0x63 out of range (0..0xf)")
    local big = {}
    for i = 1, 8193 do big[i] = 0 end
    assert.has_error(function() x86.gdt(big) end, "gdt: more than 8192 descriptors")
  end)
end)

describe("kvm.x86.long_mode", function()
  it("writes tables and GDT and sets the 64-bit sregs", function()
    local cpu, vm = fakes()
    local info = x86.long_mode(cpu, vm)
    assert.are.same({ page_tables = 0x10000, page_tables_size = 0x6000, map_size = 4 * GiB,
      gdt = 0x500, gdt_limit = 31, cr0 = 0x80000033, cr3 = 0x10000, cr4 = 0x620, efer = 0x500 }, info)

    assert.are.equal(2, #vm.writes)
    local tables = written_at(vm, 0x10000)
    assert.are.equal((x86.page_tables{ base = 0x10000 }), tables)
    assert.are.equal(0x83, u64(tables, 0x2000))
    assert.are.equal(string.rep("\0", 16)
      .. "\xff\xff\x00\x00\x00\x9b\xaf\x00"
      .. "\xff\xff\x00\x00\x00\x93\xcf\x00", written_at(vm, 0x500))

    assert.are.equal(1, #cpu.calls)
    local s = cpu.calls[1]
    local code = { selector = 0x10, base = 0, limit = 0xffffffff, type = 0xb, present = 1, dpl = 0,
      db = 0, s = 1, l = 1, g = 1, avl = 0 }
    local data = { selector = 0x18, base = 0, limit = 0xffffffff, type = 3, present = 1, dpl = 0,
      db = 1, s = 1, l = 0, g = 1, avl = 0 }
    assert.are.same({
      cs = code, ds = data, es = data, fs = data, gs = data, ss = data,
      gdt = { base = 0x500, limit = 31 },
      cr0 = x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE | x86.CR0_PG,
      cr3 = 0x10000,
      cr4 = x86.CR4_PAE | x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT,
      efer = x86.EFER_LME | x86.EFER_LMA,
    }, s)
    -- the segment tables are distinct (a caller may change one)
    assert.are_not.equal(s.ds, s.es)
  end)

  it("honours the layout and ignores unrelated keys", function()
    local cpu, vm = fakes()
    local info = x86.long_mode(cpu, vm, { gdt = 0x1000, page_tables = 0x9000, map_size = 1 * GiB,
      zero_page = 0x7000, cmdline = 0x20000 })
    assert.are.equal(0x9000, info.cr3)
    assert.are.equal(0x3000, info.page_tables_size)
    assert.are.equal(0x3000, #written_at(vm, 0x9000))
    assert.are.equal(32, #written_at(vm, 0x1000))
    assert.are.equal(0x9000, cpu.calls[1].cr3)
    assert.are.same({ base = 0x1000, limit = 31 }, cpu.calls[1].gdt)
  end)

  it("covers RAM beyond 4 GiB, rounded up to 1 GiB", function()
    local cpu, vm = fakes()
    local info = x86.long_mode(cpu, vm, { ram_size = 5 * GiB + 1 })
    assert.are.equal(6 * GiB, info.map_size)
    assert.are.equal((2 + 6) * 4096, info.page_tables_size)
    info = x86.long_mode(cpu, vm, { ram_size = 256 * MiB })
    assert.are.equal(4 * GiB, info.map_size)
  end)

  it("uses 1 GiB pages with huge_1g", function()
    local cpu, vm = fakes()
    local info = x86.long_mode(cpu, vm, { huge_1g = true })
    assert.are.equal(0x2000, info.page_tables_size)
    assert.are.equal(0x83, u64(written_at(vm, 0x10000), 0x1000))
  end)

  it("raises on bad arguments", function()
    local cpu, vm = fakes()
    assert.has_error(function() x86.long_mode(nil, vm) end,
      "long_mode: bad argument #1 (vcpu expected, got nil)")
    assert.has_error(function() x86.long_mode(cpu, 5) end,
      "long_mode: bad argument #2 (vm expected, got number)")
    assert.has_error(function() x86.long_mode(cpu, vm, "x") end,
      "long_mode: bad argument #3 (layout table expected, got string)")
    assert.has_error(function() x86.long_mode(cpu, vm, { gdt = "low" }) end,
      "long_mode: layout.gdt must be an integer, got string")
    assert.has_error(function() x86.long_mode(cpu, vm, { page_tables = -4096 }) end,
      "long_mode: layout.page_tables = 0xfffffffffffff000 is not a guest-physical address")
    assert.has_error(function() x86.long_mode(cpu, vm, { page_tables = 0x10010 }) end,
      "long_mode: page_tables: base 0x10010 is not 4 KiB aligned")
    assert.has_error(function() x86.long_mode(cpu, vm, { map_size = 3 * MiB }) end,
      "long_mode: page_tables: size 0x300000 is not a multiple of 2 MiB")
    assert.has_error(function() x86.long_mode(cpu, vm, { ram_size = 0 }) end,
      "long_mode: layout.ram_size must be an integer in 1..512 GiB")
    assert.has_error(function() x86.long_mode(cpu, vm, { gdt = 0x10ff0 }) end,
      "long_mode: GDT at 0x10ff0 overlaps the page tables at 0x10000-0x15fff")
    assert.are.equal(0, #vm.writes)
    assert.are.equal(0, #cpu.calls)
  end)
end)

describe("kvm.x86.protected_mode", function()
  it("writes a 32-bit GDT and sets flat sregs without paging", function()
    local cpu, vm = fakes()
    local info = x86.protected_mode(cpu, vm)
    assert.are.same({ gdt = 0x500, gdt_limit = 31, cr0 = 0x33, cr4 = 0x600, efer = 0 }, info)
    assert.are.equal(string.rep("\0", 16)
      .. "\xff\xff\x00\x00\x00\x9b\xcf\x00"
      .. "\xff\xff\x00\x00\x00\x93\xcf\x00", written_at(vm, 0x500))
    local s = cpu.calls[1]
    assert.are.equal(0x10, s.cs.selector)
    assert.are.equal(1, s.cs.db)
    assert.are.equal(0, s.cs.l)
    assert.are.equal(0xffffffff, s.cs.limit)
    assert.are.equal(0x18, s.ss.selector)
    assert.is_nil(s.cr3)
    assert.are.equal(0, s.efer)
  end)
end)

describe("kvm.x86.real_mode", function()
  it("sets base-0 real-mode segments", function()
    local cpu = fakes()
    x86.real_mode(cpu)
    local s = cpu.calls[1]
    for _, r in ipairs{ "cs", "ds", "es", "fs", "gs", "ss" } do
      assert.are.same({ selector = 0, base = 0, limit = 0xffff, type = r == "cs" and 0xb or 3,
        present = 1, dpl = 0, db = 0, s = 1, l = 0, g = 0, avl = 0 }, s[r])
    end
    assert.is_nil(s.cr0)
  end)
  it("takes a segment number", function()
    local cpu = fakes()
    x86.real_mode(cpu, 0x1000)
    assert.are.equal(0x10000, cpu.calls[1].ds.base)
    assert.are.equal(0x1000, cpu.calls[1].cs.selector)
  end)
  it("raises on a bad segment", function()
    local cpu = fakes()
    assert.has_error(function() x86.real_mode(cpu, 0x10000) end,
      "real_mode: bad argument #2 (segment must be an integer 0..0xffff)")
    assert.has_error(function() x86.real_mode(nil) end,
      "real_mode: bad argument #1 (vcpu expected, got nil)")
  end)
end)
