--- An e820 memory map builder: the list of RAM and reserved ranges a BIOS
-- reports and a Linux guest reads from `boot_params.e820_table`.
--
-- Addresses are unsigned 64-bit (a Lua integer above 2^63 is negative) and every
-- comparison uses `math.ult`; ranges are kept as [first, last] so a range that
-- ends at 2^64 - 1 is representable. The map is always sorted and merged.
-- @usage
-- local e820 = require "kvm.e820"
-- local map = e820.new()
-- map:add_ram(0, 0x9fc00)
-- map:reserve(0x9fc00, 0x400)
-- map:add_ram(0x100000, ram_size - 0x100000)
-- for _, e in ipairs(map:entries()) do print(e.addr, e.size, e.type) end
-- @module kvm.e820

local e820 = {}

local fmt = string.format
local ult = math.ult

--- Entry types (kvm.bootparams names them `E820_RAM` ... after the kernel,
-- with these values).
e820.RAM = 1
e820.RESERVED = 2
e820.ACPI = 3
e820.NVS = 4
e820.UNUSABLE = 5
e820.PMEM = 7

--- Most entries the zero page holds, and the default limit of a map.
e820.MAX_ENTRIES = 128

local NAMES = { [1] = "ram", [2] = "reserved", [3] = "acpi", [4] = "nvs", [5] = "unusable", [7] = "pmem" }

local Map = {}
Map.__index = Map

local function range_str(first, last)
  return fmt("[0x%x-0x%x]", first, last)
end

--- Create an empty map.
-- @tparam[opt=128] integer max most entries the map may hold after merging
-- @treturn map
function e820.new(max)
  if max == nil then max = e820.MAX_ENTRIES end
  if math.type(max) ~= "integer" or max < 1 then
    error("e820.new: max must be a positive integer", 2)
  end
  return setmetatable({ list = {}, max = max }, Map)
end

-- Validate addr/size/type; returns first, last or nil, message.
local function check(addr, size, ty)
  if math.type(addr) ~= "integer" then
    return nil, "e820: addr must be an integer, got " .. (math.type(addr) or type(addr))
  end
  if math.type(size) ~= "integer" then
    return nil, "e820: size must be an integer, got " .. (math.type(size) or type(size))
  end
  if math.type(ty) ~= "integer" then
    return nil, "e820: type must be an integer, got " .. (math.type(ty) or type(ty))
  end
  if size == 0 then return nil, "e820: size is 0" end
  if size < 0 then return nil, fmt("e820: size %d is negative", size) end
  if ty < 1 or ty > 0xffffffff then
    return nil, fmt("e820: type %d out of range (1..0xffffffff)", ty)
  end
  local last = addr + (size - 1)
  if ult(last, addr) then
    return nil, fmt("e820: range at 0x%x of size 0x%x overflows 64 bits", addr, size)
  end
  return addr, last
end

-- Add a range; returns true or nil, message (the map is unchanged on failure).
local function add(self, addr, size, ty)
  if getmetatable(self) ~= Map then
    return nil, "e820: call as map:add(...), with a colon"
  end
  local first, last = check(addr, size, ty)
  if not first then return nil, last end
  local list = self.list
  -- First pass: refuse conflicts before changing anything.
  for _, e in ipairs(list) do
    local disjoint = ult(e.last, first) or ult(last, e.first)
    if not disjoint and e.type ~= ty then
      return nil, fmt("e820: %s type %d overlaps %s type %d",
        range_str(first, last), ty, range_str(e.first, e.last), e.type)
    end
  end
  -- Second pass: absorb same-type neighbours and overlaps.
  local keep = {}
  for _, e in ipairs(list) do
    local touches = e.type == ty and (
      not (ult(e.last, first) or ult(last, e.first))
      or (e.last ~= -1 and e.last + 1 == first)
      or (last ~= -1 and last + 1 == e.first))
    if touches then
      if ult(e.first, first) then first = e.first end
      if ult(last, e.last) then last = e.last end
    else
      keep[#keep + 1] = e
    end
  end
  if #keep + 1 > self.max then
    return nil, fmt("e820: more than %d entries", self.max)
  end
  local pos = #keep + 1
  for i, e in ipairs(keep) do
    if ult(first, e.first) then pos = i break end
  end
  table.insert(keep, pos, { first = first, last = last, type = ty })
  self.list = keep
  return true
end

--- Add a range.
-- A range of the same type that overlaps or touches an existing one merges with
-- it; overlapping a range of another type raises. On an error the map is
-- unchanged.
-- @tparam integer addr first address (unsigned 64-bit)
-- @tparam integer size bytes, > 0
-- @tparam integer ty entry type (`e820.RAM`, `e820.RESERVED`, ...), 1..0xffffffff
-- @treturn map the map itself
-- @raise on a size of 0 or below, a range past 2^64, a non-integer, an overlap
--   with another type, or more than `max` entries
function Map:add(addr, size, ty)
  local ok, err = add(self, addr, size, ty)
  if not ok then error(err, 2) end
  return self
end

--- Add a RAM range (`add(addr, size, e820.RAM)`).
-- @tparam integer addr
-- @tparam integer size
-- @treturn map
function Map:add_ram(addr, size)
  local ok, err = add(self, addr, size, e820.RAM)
  if not ok then error(err, 2) end
  return self
end

--- Add a reserved range (`add(addr, size, e820.RESERVED)`).
-- @tparam integer addr
-- @tparam integer size
-- @treturn map
function Map:reserve(addr, size)
  local ok, err = add(self, addr, size, e820.RESERVED)
  if not ok then error(err, 2) end
  return self
end

--- Sort the map. The map is kept sorted by `add`, so this only returns it; it is
-- here for callers that build maps in other ways.
-- @treturn map
function Map:sort()
  table.sort(self.list, function(a, b) return ult(a.first, b.first) end)
  return self
end

--- The entries, sorted by address and merged.
-- A range reaching 2^64 - 1 cannot have its size (2^64 - addr) expressed when
-- addr is 0; such a map is refused.
-- @treturn {{addr=, size=, type=},...} fresh tables, safe to change
function Map:entries()
  local out = {}
  for i, e in ipairs(self.list) do
    local size = e.last - e.first + 1
    if size == 0 then error("e820: a range covering all of 2^64 has no 64-bit size", 2) end
    out[i] = { addr = e.first, size = size, type = e.type }
  end
  return out
end

--- Find the entry containing an address.
-- @tparam integer addr
-- @treturn table|nil `{addr=, size=, type=}` or nil when no range holds `addr`
function Map:find(addr)
  if getmetatable(self) ~= Map then
    error("e820: call as map:find(addr), with a colon", 2)
  end
  if math.type(addr) ~= "integer" then
    error("e820: find: addr must be an integer, got " .. (math.type(addr) or type(addr)), 2)
  end
  for _, e in ipairs(self.list) do
    if not ult(addr, e.first) and not ult(e.last, addr) then
      return { addr = e.first, size = e.last - e.first + 1, type = e.type }
    end
  end
  return nil
end

--- A map holding `entries` (a list of `{addr=, size=, type=}`, as
-- `Map:entries` returns), added in order.
-- @tparam table entries
-- @tparam[opt=128] integer max
-- @treturn map
-- @raise as `Map:add`, naming the entry
function e820.from_entries(entries, max)
  if type(entries) ~= "table" then
    error("e820.from_entries: expected a list of {addr=, size=, type=}, got " .. type(entries), 2)
  end
  local map = e820.new(max)
  for i, e in ipairs(entries) do
    local ok, err = add(map, e.addr, e.size, e.type)
    if not ok then error(fmt("e820.from_entries: entry %d: %s", i, err), 2) end
  end
  return map
end

--- Number of entries.
function Map:__len() return #self.list end

--- One line per entry: `0x0000000000000000-0x000000000009fbff ram`.
function Map:__tostring()
  local lines = {}
  for _, e in ipairs(self.list) do
    lines[#lines + 1] = fmt("0x%016x-0x%016x %s", e.first, e.last, NAMES[e.type] or tostring(e.type))
  end
  return table.concat(lines, "\n")
end

return e820
