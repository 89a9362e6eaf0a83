-- kvm.e820: building, merging, refusing overlaps, 64-bit edges.
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path

local e820 = require "kvm.e820"

local RAM, RES = e820.RAM, e820.RESERVED

local function E(addr, size, type) return { addr = addr, size = size, type = type } end

describe("kvm.e820", function()
  it("has the e820 type numbers", function()
    assert.are.same({ 1, 2, 3, 4, 5, 7 }, { e820.RAM, e820.RESERVED, e820.ACPI, e820.NVS, e820.UNUSABLE, e820.PMEM })
    assert.are.equal(128, e820.MAX_ENTRIES)
  end)

  it("builds a PC map, sorted", function()
    local map = e820.new()
    map:add_ram(0x100000, 0x7ff00000)
    map:add_ram(0, 0x9fc00)
    map:reserve(0x9fc00, 0x400)
    map:reserve(0xf0000, 0x10000)
    map:add(0xfec00000, 0x1000, RES)
    assert.are.same({
      E(0, 0x9fc00, RAM), E(0x9fc00, 0x400, RES), E(0xf0000, 0x10000, RES),
      E(0x100000, 0x7ff00000, RAM), E(0xfec00000, 0x1000, RES),
    }, map:entries())
    assert.are.equal(5, #map)
    assert.are.equal(table.concat({
      "0x0000000000000000-0x000000000009fbff ram",
      "0x000000000009fc00-0x000000000009ffff reserved",
      "0x00000000000f0000-0x00000000000fffff reserved",
      "0x0000000000100000-0x000000007fffffff ram",
      "0x00000000fec00000-0x00000000fec00fff reserved",
    }, "\n"), tostring(map))
  end)

  it("returns the map from add, add_ram, reserve and sort", function()
    local map = e820.new()
    assert.are.equal(map, map:add(0, 1, RAM))
    assert.are.equal(map, map:add_ram(1, 1))
    assert.are.equal(map, map:reserve(2, 1))
    assert.are.equal(map, map:sort())
    assert.are.same({ E(0, 2, RAM), E(2, 1, RES) }, map:entries())
  end)

  it("merges adjacent ranges of the same type", function()
    local map = e820.new():add_ram(0, 0x1000):add_ram(0x2000, 0x1000):add_ram(0x1000, 0x1000)
    assert.are.same({ E(0, 0x3000, RAM) }, map:entries())
  end)

  it("merges overlapping and contained ranges of the same type", function()
    local map = e820.new():add_ram(0x1000, 0x3000):add_ram(0x2000, 0x4000):add_ram(0x1800, 0x10)
    assert.are.same({ E(0x1000, 0x5000, RAM) }, map:entries())
    map:add_ram(0, 0x10000)
    assert.are.same({ E(0, 0x10000, RAM) }, map:entries())
  end)

  it("merges a range bridging several", function()
    local map = e820.new()
    for i = 0, 9 do map:add_ram(i * 0x2000, 0x1000) end
    assert.are.equal(10, #map)
    map:add_ram(0x800, 0x13000)
    assert.are.same({ E(0, 0x13800, RAM) }, map:entries())
  end)

  it("does not merge adjacent ranges of different types", function()
    local map = e820.new():add_ram(0, 0x1000):reserve(0x1000, 0x1000):add_ram(0x2000, 0x1000)
    assert.are.same({ E(0, 0x1000, RAM), E(0x1000, 0x1000, RES), E(0x2000, 0x1000, RAM) }, map:entries())
  end)

  it("refuses an overlap with another type and stays unchanged", function()
    local map = e820.new():add_ram(0, 0xa0000):add_ram(0xa0000 + 0x1000, 0x1000)
    assert.has_error(function() map:reserve(0x9f000, 0x2000) end,
      "e820: [0x9f000-0xa0fff] type 2 overlaps [0x0-0x9ffff] type 1")
    assert.has_error(function() map:add(0xa1fff, 2, 4) end,
      "e820: [0xa1fff-0xa2000] type 4 overlaps [0xa1000-0xa1fff] type 1")
    assert.are.same({ E(0, 0xa0000, RAM), E(0xa1000, 0x1000, RAM) }, map:entries())
  end)

  it("reports the first overlapping range", function()
    local map = e820.new():add_ram(0, 0x1000):add_ram(0x2000, 0x1000)
    assert.has_error(function() map:reserve(0x800, 0x2000) end,
      "e820: [0x800-0x27ff] type 2 overlaps [0x0-0xfff] type 1")
    assert.are.same({ E(0, 0x1000, RAM), E(0x2000, 0x1000, RAM) }, map:entries())
  end)

  it("handles addresses above 2^63 (negative integers) with unsigned order", function()
    local map = e820.new()
    map:reserve(0xffffffff81000000, 0x1000000)
    map:add_ram(0x100000000, 0x40000000)
    map:add_ram(0, 0x1000)
    assert.are.same({ E(0, 0x1000, RAM), E(0x100000000, 0x40000000, RAM),
      E(0xffffffff81000000, 0x1000000, RES) }, map:entries())
    assert.are.same(E(0xffffffff81000000, 0x1000000, RES), map:find(0xffffffff81ffffff))
    assert.is_nil(map:find(0xffffffff82000000))
  end)

  it("accepts a range ending exactly at 2^64 - 1", function()
    local map = e820.new():reserve(-0x1000, 0x1000)
    assert.are.same({ E(-0x1000, 0x1000, RES) }, map:entries())
    assert.are.same(E(-0x1000, 0x1000, RES), map:find(-1))
    -- adjacent below merges; nothing wraps around to address 0
    map:reserve(-0x2000, 0x1000):add_ram(0, 0x1000)
    assert.are.same({ E(0, 0x1000, RAM), E(-0x2000, 0x2000, RES) }, map:entries())
    assert.are.equal(2, #e820.new():reserve(-0x1000, 0x1000):reserve(0, 0x1000))
  end)

  it("accepts the largest range that fits", function()
    local map = e820.new():add_ram(0x8000000000000001, 0x7fffffffffffffff)
    assert.are.same({ E(0x8000000000000001, 0x7fffffffffffffff, RAM) }, map:entries())
  end)

  it("refuses to list a merged range covering all 2^64 addresses", function()
    local map = e820.new():reserve(0, math.maxinteger):reserve(math.maxinteger, math.maxinteger):reserve(-2, 2)
    assert.are.equal(1, #map)
    assert.has_error(function() map:entries() end, "e820: a range covering all of 2^64 has no 64-bit size")
  end)

  it("finds entries by address", function()
    local map = e820.new():add_ram(0, 0x9fc00):reserve(0xf0000, 0x10000)
    assert.are.same(E(0, 0x9fc00, RAM), map:find(0))
    assert.are.same(E(0, 0x9fc00, RAM), map:find(0x9fbff))
    assert.is_nil(map:find(0x9fc00))
    assert.are.same(E(0xf0000, 0x10000, RES), map:find(0xfffff))
    assert.is_nil(map:find(0x100000))
    assert.is_nil(map:find(-1))
  end)

  it("returns fresh entry tables", function()
    local map = e820.new():add_ram(0, 0x1000)
    map:entries()[1].size = 1
    map:find(0).addr = 5
    assert.are.same({ E(0, 0x1000, RAM) }, map:entries())
  end)

  it("holds 128 entries and refuses the 129th, unchanged", function()
    local map = e820.new()
    for i = 0, 127 do map:add(i * 0x2000, 0x1000, RAM) end
    assert.are.equal(128, #map)
    assert.has_error(function() map:add_ram(128 * 0x2000, 0x1000) end, "e820: more than 128 entries")
    assert.are.equal(128, #map)
    -- a merge that does not add an entry is still fine
    map:add_ram(0x1000, 0x1000)
    assert.are.equal(127, #map)
    map:add_ram(128 * 0x2000, 0x1000)
    assert.are.equal(128, #map)
  end)

  it("takes another limit", function()
    local map = e820.new(2):add_ram(0, 1):reserve(1, 1)
    assert.has_error(function() map:add_ram(4, 1) end, "e820: more than 2 entries")
    assert.has_error(function() e820.new(0) end, "e820.new: max must be a positive integer")
    assert.has_error(function() e820.new("x") end, "e820.new: max must be a positive integer")
  end)

  local bad = {
    { "a zero size", { 0x1000, 0, RAM }, "e820: size is 0" },
    { "a negative size", { 0x1000, -0x1000, RAM }, "e820: size -4096 is negative" },
    { "an overflowing range", { -0x1000, 0x1001, RAM },
      "e820: range at 0xfffffffffffff000 of size 0x1001 overflows 64 bits" },
    { "a huge range", { 0x8000000000000002, 0x7fffffffffffffff, RAM },
      "e820: range at 0x8000000000000002 of size 0x7fffffffffffffff overflows 64 bits" },
    { "a float addr", { 0.5, 1, RAM }, "e820: addr must be an integer, got float" },
    { "a string size", { 0, "1", RAM }, "e820: size must be an integer, got string" },
    { "a nil type", { 0, 1 }, "e820: type must be an integer, got nil" },
    { "type 0", { 0, 1, 0 }, "e820: type 0 out of range (1..0xffffffff)" },
    { "a 33-bit type", { 0, 1, 1 << 32 }, "e820: type 4294967296 out of range (1..0xffffffff)" },
  }
  for _, c in ipairs(bad) do
    it("raises on " .. c[1], function()
      local map = e820.new()
      assert.has_error(function() map:add(c[2][1], c[2][2], c[2][3]) end, c[3])
      assert.are.equal(0, #map)
    end)
  end

  it("raises at the caller's level", function()
    local map = e820.new()
    local ok, err = pcall(function() map:add_ram(0, 0) end)
    assert.is_false(ok)
    assert.matches("^spec/unit/e820_spec.lua:%d+: e820: size is 0$", err)
    ok, err = pcall(function() map:reserve(0, -1) end)
    assert.is_false(ok)
    assert.matches("^spec/unit/e820_spec.lua:%d+: e820: size %-1 is negative$", err)
  end)

  it("raises when called with a dot", function()
    local map = e820.new()
    assert.has_error(function() map.add(0, 1, RAM) end, "e820: call as map:add(...), with a colon")
    assert.has_error(function() map.find(0) end, "e820: call as map:find(addr), with a colon")
    assert.has_error(function() map:find("0") end, "e820: find: addr must be an integer, got string")
  end)
  it("builds a map from entries (from_entries), the way back from entries()", function()
    local list = { { addr = 0, size = 0x9fc00, type = RAM }, { addr = 0x9fc00, size = 0x400, type = RES },
                   { addr = 0x100000, size = 0x100000, type = RAM }, { addr = 0x200000, size = 0x1000, type = RAM } }
    local map = e820.from_entries(list)
    assert.are.same({ list[1], list[2], { addr = 0x100000, size = 0x101000, type = RAM } }, map:entries())
    assert.has_error(function() e820.from_entries{ { addr = 0, size = 0, type = RAM } } end,
      "e820.from_entries: entry 1: e820: size is 0")
    assert.has_error(function() e820.from_entries(5) end,
      "e820.from_entries: expected a list of {addr=, size=, type=}, got number")
  end)
end)
