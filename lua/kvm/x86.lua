--- x86-64 processor state a VMM builds for its guests: control-register bits,
-- identity-mapped page tables, segment descriptors and GDTs, and the sregs for
-- real, flat 32-bit protected and 64-bit long mode.
--
-- Everything here is pure Lua; the functions that touch a VM or a vCPU only call
-- `vm:write(gpa, bytes)` and `cpu:set_sregs(t)`, so any object with those methods
-- will do (the specs use fakes).
--
-- Addresses are Lua integers (64-bit); address arithmetic uses `&`, `|`, `<<`,
-- `>>` and `math.ult`, never `/` or `//`.
-- @module kvm.x86

local x86 = {}

local fmt = string.format
local pack = string.pack

local KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

-- Control register 0.
x86.CR0_PE = 0x1          -- protection enable
x86.CR0_MP = 0x2          -- monitor coprocessor
x86.CR0_EM = 0x4          -- x87 emulation (must be 0 for SSE)
x86.CR0_TS = 0x8          -- task switched
x86.CR0_ET = 0x10         -- extension type (hard-wired to 1 on modern CPUs)
x86.CR0_NE = 0x20         -- native x87 error reporting
x86.CR0_WP = 0x10000      -- supervisor write protect
x86.CR0_AM = 0x40000      -- alignment mask
x86.CR0_NW = 0x20000000   -- not write-through
x86.CR0_CD = 0x40000000   -- cache disable
x86.CR0_PG = 0x80000000   -- paging

-- Control register 4.
x86.CR4_VME = 0x1
x86.CR4_PVI = 0x2
x86.CR4_TSD = 0x4
x86.CR4_DE = 0x8
x86.CR4_PSE = 0x10
x86.CR4_PAE = 0x20
x86.CR4_MCE = 0x40
x86.CR4_PGE = 0x80
x86.CR4_PCE = 0x100
x86.CR4_OSFXSR = 0x200
x86.CR4_OSXMMEXCPT = 0x400
x86.CR4_UMIP = 0x800
x86.CR4_LA57 = 0x1000
x86.CR4_VMXE = 0x2000
x86.CR4_SMXE = 0x4000
x86.CR4_FSGSBASE = 0x10000
x86.CR4_PCIDE = 0x20000
x86.CR4_OSXSAVE = 0x40000
x86.CR4_SMEP = 0x100000
x86.CR4_SMAP = 0x200000

-- IA32_EFER (MSR 0xc0000080).
x86.MSR_EFER = 0xc0000080
x86.EFER_SCE = 0x1        -- syscall enable
x86.EFER_LME = 0x100      -- long mode enable
x86.EFER_LMA = 0x400      -- long mode active
x86.EFER_NXE = 0x800      -- no-execute enable

-- Page-table entry bits.
x86.PTE_P = 0x1           -- present
x86.PTE_RW = 0x2          -- writable
x86.PTE_US = 0x4          -- user
x86.PTE_PWT = 0x8
x86.PTE_PCD = 0x10
x86.PTE_A = 0x20          -- accessed
x86.PTE_D = 0x40          -- dirty
x86.PTE_PS = 0x80         -- large page (2 MiB in a PD, 1 GiB in a PDPT)
x86.PTE_G = 0x100         -- global
x86.PTE_NX = 1 << 63      -- no-execute (needs EFER.NXE)

-- RFLAGS.
x86.RFLAGS_CF = 0x1
x86.RFLAGS_RESERVED = 0x2 -- bit 1 always reads as 1
x86.RFLAGS_TF = 0x100
x86.RFLAGS_IF = 0x200
x86.RFLAGS_DF = 0x400

-- Segment descriptor types (with s = 1).
x86.SEG_DATA_RW = 0x3     -- read/write, accessed
x86.SEG_CODE_RX = 0xb     -- execute/read, accessed

--- GDT selectors used by `long_mode` and `protected_mode`.
-- They are the Linux boot protocol's `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18)
-- (Documentation/arch/x86/boot.rst, 32- and 64-bit boot protocol), so the same
-- state boots a Linux kernel; GDT entries 0 and 1 are null.
x86.CODE_SEL = 0x10
x86.DATA_SEL = 0x18

--- Default guest-physical layout for `long_mode` and `protected_mode`.
-- `gdt` = 0x500 (the GDT, 32 bytes), `page_tables` = 0x10000 (the PML4; with the
-- default 4 GiB map the tables take 6 pages, 0x10000-0x15fff). The tables grow by
-- one page per GiB mapped, so keep room after `page_tables` or use `huge_1g`.
x86.DEFAULT_LAYOUT = { gdt = 0x500, page_tables = 0x10000 }

--- Default number of bytes `long_mode` identity-maps: 4 GiB.
x86.DEFAULT_MAP_SIZE = 4 * GiB

--- Largest identity map `page_tables` builds: 512 GiB (one PML4 entry).
x86.MAX_MAP_SIZE = 512 * GiB

local PAGE = 4 * KiB
local PAGE_MASK = PAGE - 1
local MAXPHYS = 1 << 52

local function hex(v) return fmt("0x%x", v) end

local function is_int(v) return math.type(v) == "integer" end

-- Validate and build the tables; returns bytes, info or nil, message.
local function build_tables(opts)
  if type(opts) ~= "table" then
    return nil, "page_tables: expected a table of options, got " .. type(opts)
  end
  for k in pairs(opts) do
    if k ~= "base" and k ~= "size" and k ~= "huge_1g" then
      return nil, fmt("page_tables: unknown option '%s'", tostring(k))
    end
  end
  local base, size, huge = opts.base, opts.size, opts.huge_1g
  if size == nil then size = x86.DEFAULT_MAP_SIZE end
  if not is_int(base) then
    return nil, "page_tables: base must be an integer, got " .. type(base)
  end
  if not is_int(size) then
    return nil, "page_tables: size must be an integer, got " .. type(size)
  end
  if huge ~= nil and type(huge) ~= "boolean" then
    return nil, "page_tables: huge_1g must be a boolean, got " .. type(huge)
  end
  if base & PAGE_MASK ~= 0 then
    return nil, fmt("page_tables: base %s is not 4 KiB aligned", hex(base))
  end
  if size <= 0 then
    return nil, fmt("page_tables: size %d must be positive", size)
  end
  if size > x86.MAX_MAP_SIZE then
    return nil, fmt("page_tables: size %s exceeds 512 GiB", hex(size))
  end
  local ngib = (size + GiB - 1) >> 30
  if huge then
    if size & (GiB - 1) ~= 0 then
      return nil, fmt("page_tables: size %s is not a multiple of 1 GiB (huge_1g)", hex(size))
    end
  elseif size & (2 * MiB - 1) ~= 0 then
    return nil, fmt("page_tables: size %s is not a multiple of 2 MiB", hex(size))
  end
  local npd = huge and 0 or ngib
  local tsize = (2 + npd) * PAGE
  -- base is aligned and not negative-as-unsigned beyond 2^52 (a physical address)
  if math.ult(MAXPHYS - tsize, base) then
    return nil, fmt("page_tables: tables at %s (%s bytes) end beyond 2^52", hex(base), hex(tsize))
  end

  local P_RW = x86.PTE_P | x86.PTE_RW
  local LARGE = P_RW | x86.PTE_PS
  local pdpt = base + PAGE
  local out = {}
  -- PML4: entry 0 points to the PDPT, the other 511 are empty.
  out[1] = pack("<I8", pdpt | P_RW) .. string.rep("\0", PAGE - 8)
  -- PDPT.
  local ents = {}
  for i = 0, ngib - 1 do
    if huge then
      ents[#ents + 1] = pack("<I8", (i << 30) | LARGE)
    else
      ents[#ents + 1] = pack("<I8", (base + (2 + i) * PAGE) | P_RW)
    end
  end
  out[2] = table.concat(ents) .. string.rep("\0", PAGE - 8 * ngib)
  -- Page directories of 2 MiB pages; the last one may be partial.
  local npages = size >> 21
  for d = 0, npd - 1 do
    ents = {}
    local first = d * 512
    local last = math.min(first + 512, npages) - 1
    for p = first, last do
      ents[#ents + 1] = pack("<I8", (p << 21) | LARGE)
    end
    out[#out + 1] = table.concat(ents) .. string.rep("\0", PAGE - 8 * #ents)
  end
  local bytes = table.concat(out)
  return bytes, {
    pml4 = base,
    pdpt = pdpt,
    pd = npd > 0 and base + 2 * PAGE or nil,
    npd = npd,
    map_size = size,
    size = #bytes,
  }
end

--- Build identity-mapping 4-level page tables.
-- Layout: the PML4 at `base`, the PDPT at `base + 0x1000`, then (unless
-- `huge_1g`) one page directory per GiB of 2 MiB pages. Every leaf entry is
-- `addr | PTE_P | PTE_RW | PTE_PS` (0x83 | addr); table pointers are `addr | 0x3`.
-- With `huge_1g` the PDPT maps 1 GiB pages directly (the guest CPU must have
-- CPUID pdpe1gb) and there are no page directories.
-- @tparam table opts `base` (integer, 4 KiB aligned guest-physical address of
--   the PML4), `size` (bytes to identity-map from 0; default 4 GiB; a multiple of
--   2 MiB, or of 1 GiB with `huge_1g`; at most 512 GiB), `huge_1g` (boolean,
--   default false).
-- @treturn string the tables' bytes, to be written at `base`
-- @treturn table `{pml4=, pdpt=, pd= (first PD, nil with huge_1g), npd=,
--   map_size=, size= (bytes of the tables)}`
-- @raise on a bad option, with a message naming it
function x86.page_tables(opts)
  local bytes, info = build_tables(opts)
  if not bytes then error(info, 2) end
  return bytes, info
end

local SEG_FIELDS = {
  base = 0xffffffff, limit = 0xfffff, type = 0xf, dpl = 3,
  s = 1, present = 1, avl = 1, l = 1, db = 1, g = 1,
}

local function seg_field(t, k, where)
  local v = t[k]
  if v == nil or v == false then return 0 end
  if v == true then
    if SEG_FIELDS[k] ~= 1 then
      return nil, fmt("%s: field '%s' must be an integer, got boolean", where, k)
    end
    return 1
  end
  if not is_int(v) then
    return nil, fmt("%s: field '%s' must be an integer, got %s", where, k, math.type(v) or type(v))
  end
  if v < 0 or v > SEG_FIELDS[k] then
    return nil, fmt("%s: field '%s' = %s out of range (0..%s)", where, k, hex(v), hex(SEG_FIELDS[k]))
  end
  return v
end

local function encode_segment(t, where)
  if type(t) ~= "table" then
    return nil, fmt("%s: expected a table, got %s", where, type(t))
  end
  for k in pairs(t) do
    if SEG_FIELDS[k] == nil then
      return nil, fmt("%s: unknown field '%s'", where, tostring(k))
    end
  end
  local f = {}
  for k in pairs(SEG_FIELDS) do
    local v, err = seg_field(t, k, where)
    if not v then return nil, err end
    f[k] = v
  end
  return (f.limit & 0xffff)
    | ((f.base & 0xffffff) << 16)
    | (f.type << 40)
    | (f.s << 44)
    | (f.dpl << 45)
    | (f.present << 47)
    | ((f.limit >> 16) << 48)
    | (f.avl << 52)
    | (f.l << 53)
    | (f.db << 54)
    | (f.g << 55)
    | ((f.base >> 24) << 56)
end

--- Encode an 8-byte segment descriptor.
-- Fields (all default 0; flags may be 0/1 or booleans): `base` (32-bit),
-- `limit` (the descriptor's raw 20-bit limit, in 4 KiB units when `g` = 1),
-- `type` (4 bits; 0xb code execute/read accessed, 3 data read/write accessed),
-- `s` (1 = code/data), `dpl` (0-3), `present`, `avl`, `l` (64-bit code),
-- `db` (32-bit default size), `g` (4 KiB granularity).
-- @tparam table t the descriptor fields
-- @treturn integer the descriptor as a 64-bit integer (may be negative)
-- @raise on an unknown field or a value out of range
-- @usage x86.segment{limit=0xfffff, type=0xb, s=1, present=1, l=1, g=1}
--   --> 0x00af9b000000ffff
function x86.segment(t)
  local d, err = encode_segment(t, "segment")
  if not d then error(err, 2) end
  return d
end

--- Decode an 8-byte segment descriptor (the inverse of `segment`).
-- @tparam integer d the descriptor
-- @treturn table `{base=, limit=, type=, s=, dpl=, present=, avl=, l=, db=, g=}`
--   with integer flags 0/1
function x86.decode_segment(d)
  if not is_int(d) then
    error("decode_segment: expected an integer, got " .. (math.type(d) or type(d)), 2)
  end
  return {
    limit = (d & 0xffff) | (((d >> 48) & 0xf) << 16),
    base = ((d >> 16) & 0xffffff) | (((d >> 56) & 0xff) << 24),
    type = (d >> 40) & 0xf,
    s = (d >> 44) & 1,
    dpl = (d >> 45) & 3,
    present = (d >> 47) & 1,
    avl = (d >> 52) & 1,
    l = (d >> 53) & 1,
    db = (d >> 54) & 1,
    g = (d >> 55) & 1,
  }
end

--- Convert descriptor fields to the segment table `cpu:set_sregs` takes.
-- The limit is expanded to bytes when `g` = 1 (`limit << 12 | 0xfff`), as the
-- CPU caches it; the flags become integers 0/1.
-- @tparam table t descriptor fields, as for `segment`
-- @tparam integer selector the selector to load (default 0)
-- @treturn table `{selector=, base=, limit=, type=, present=, dpl=, db=, s=, l=, g=, avl=}`
function x86.sreg_segment(t, selector)
  local d, err = encode_segment(t, "sreg_segment")
  if not d then error(err, 2) end
  if selector ~= nil and (not is_int(selector) or selector < 0 or selector > 0xffff) then
    error("sreg_segment: selector must be an integer 0..0xffff", 2)
  end
  local s = x86.decode_segment(d)
  if s.g == 1 then s.limit = (s.limit << 12) | 0xfff end
  s.selector = selector or 0
  return s
end

--- Build a GDT.
-- Each item is a descriptor integer or a table of fields for `segment`. Entry 0
-- is not added for you: give 0 first for the null descriptor.
-- @tparam {integer|table,...} list the descriptors, in selector order
-- @treturn string the table's bytes (8 per entry); its GDTR limit is `#bytes - 1`
-- @raise on an empty list or a bad descriptor
-- @usage x86.gdt{0, 0, x86.FLAT_CODE64, x86.FLAT_DATA}
function x86.gdt(list)
  if type(list) ~= "table" then
    error("gdt: expected a list of descriptors, got " .. type(list), 2)
  end
  if #list == 0 then error("gdt: empty descriptor list", 2) end
  if #list > 8192 then error("gdt: more than 8192 descriptors", 2) end
  local out = {}
  for i, item in ipairs(list) do
    local d = item
    if type(item) == "table" then
      local err
      d, err = encode_segment(item, fmt("gdt: entry %d", i))
      if not d then error(err, 2) end
    elseif not is_int(item) then
      error(fmt("gdt: entry %d must be an integer or a table, got %s", i, type(item)), 2)
    end
    out[i] = pack("<I8", d)
  end
  return table.concat(out)
end

--- Flat 4 GiB descriptors (as field tables) used by the mode helpers.
x86.FLAT_CODE64 = { base = 0, limit = 0xfffff, type = 0xb, s = 1, present = 1, l = 1, g = 1 }
x86.FLAT_CODE32 = { base = 0, limit = 0xfffff, type = 0xb, s = 1, present = 1, db = 1, g = 1 }
x86.FLAT_DATA = { base = 0, limit = 0xfffff, type = 0x3, s = 1, present = 1, db = 1, g = 1 }

local function check_addr(where, name, v)
  if not is_int(v) then
    error(fmt("%s: layout.%s must be an integer, got %s", where, name, type(v)), 3)
  end
  if v < 0 or v >= MAXPHYS then
    error(fmt("%s: layout.%s = %s is not a guest-physical address", where, name, hex(v)), 3)
  end
end

local function check_objs(where, cpu, vm)
  if type(cpu) ~= "table" and type(cpu) ~= "userdata" then
    error(fmt("%s: bad argument #1 (vcpu expected, got %s)", where, type(cpu)), 3)
  end
  if vm ~= false and type(vm) ~= "table" and type(vm) ~= "userdata" then
    error(fmt("%s: bad argument #2 (vm expected, got %s)", where, type(vm)), 3)
  end
end

-- Write the boot GDT {null, null, code, data} and return its base and limit.
local function write_gdt(vm, at, code)
  local bytes = x86.gdt{ 0, 0, code, x86.FLAT_DATA }
  vm:write(at, bytes)
  return { base = at, limit = #bytes - 1 }
end

local function flat_sregs(code)
  local data = x86.sreg_segment(x86.FLAT_DATA, x86.DATA_SEL)
  local t = { cs = x86.sreg_segment(code, x86.CODE_SEL) }
  for _, r in ipairs{ "ds", "es", "fs", "gs", "ss" } do
    local c = {}
    for k, v in pairs(data) do c[k] = v end
    t[r] = c
  end
  return t
end

--- Put a vCPU in 64-bit long mode with flat segments and identity paging.
-- Writes the page tables (see `page_tables`) at `layout.page_tables` and the GDT
-- {null, null, 64-bit code at `CODE_SEL` (0x10), data at `DATA_SEL` (0x18)} at
-- `layout.gdt` with `vm:write`, then calls `cpu:set_sregs` with cs (64-bit
-- code, limit 0xffffffff), ds/es/fs/gs/ss (flat data), gdt, and
-- `cr0 = PE|MP|ET|NE|PG` (0x80000033), `cr3 = layout.page_tables`,
-- `cr4 = PAE|OSFXSR|OSXMMEXCPT` (0x620, so SSE works), `efer = LME|LMA` (0x500).
-- It sets nothing else: rip, rsp, rsi and rflags (give `rflags = 2`, interrupts
-- off) are the caller's, via `cpu:set_regs`; the IDT, TR and LDT keep KVM's
-- reset values.
-- @param cpu a vCPU (anything with `set_sregs`)
-- @param vm a VM (anything with `write(gpa, bytes)`)
-- @tparam[opt] table layout `gdt` (default 0x500), `page_tables` (default
--   0x10000), `map_size` (bytes to identity-map; default the larger of 4 GiB and
--   `ram_size` rounded up to 1 GiB), `ram_size`, `huge_1g` (default false).
--   Other keys are ignored, so a wider boot layout table can be passed.
-- @treturn table `{page_tables=, page_tables_size=, map_size=, gdt=, gdt_limit=,
--   cr0=, cr3=, cr4=, efer=}`
-- @raise on a bad layout (and whatever `vm:write`/`cpu:set_sregs` raise)
function x86.long_mode(cpu, vm, layout)
  check_objs("long_mode", cpu, vm)
  layout = layout or {}
  if type(layout) ~= "table" then
    error("long_mode: bad argument #3 (layout table expected, got " .. type(layout) .. ")", 2)
  end
  local gdt_at = layout.gdt or x86.DEFAULT_LAYOUT.gdt
  local pt_at = layout.page_tables or x86.DEFAULT_LAYOUT.page_tables
  check_addr("long_mode", "gdt", gdt_at)
  check_addr("long_mode", "page_tables", pt_at)
  local map_size = layout.map_size
  if map_size == nil then
    map_size = x86.DEFAULT_MAP_SIZE
    local ram = layout.ram_size
    if ram ~= nil then
      if not is_int(ram) or ram <= 0 or ram > x86.MAX_MAP_SIZE then
        error("long_mode: layout.ram_size must be an integer in 1..512 GiB", 2)
      end
      local r = (ram + GiB - 1) & ~(GiB - 1)
      if r > map_size then map_size = r end
    end
  end
  local tables, info = build_tables{ base = pt_at, size = map_size, huge_1g = layout.huge_1g }
  if not tables then error("long_mode: " .. info, 2) end
  -- GDT and tables must not overlap (both are written).
  local gdt_size = 4 * 8
  if not (gdt_at + gdt_size <= pt_at or pt_at + #tables <= gdt_at) then
    error(fmt("long_mode: GDT at %s overlaps the page tables at %s-%s",
      hex(gdt_at), hex(pt_at), hex(pt_at + #tables - 1)), 2)
  end
  vm:write(pt_at, tables)
  local gdtr = write_gdt(vm, gdt_at, x86.FLAT_CODE64)
  local sregs = flat_sregs(x86.FLAT_CODE64)
  sregs.gdt = gdtr
  sregs.cr0 = x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE | x86.CR0_PG
  sregs.cr3 = pt_at
  sregs.cr4 = x86.CR4_PAE | x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT
  sregs.efer = x86.EFER_LME | x86.EFER_LMA
  cpu:set_sregs(sregs)
  return {
    page_tables = pt_at, page_tables_size = #tables, map_size = map_size,
    gdt = gdt_at, gdt_limit = gdtr.limit,
    cr0 = sregs.cr0, cr3 = sregs.cr3, cr4 = sregs.cr4, efer = sregs.efer,
  }
end

--- Put a vCPU in flat 32-bit protected mode, paging off.
-- Writes the GDT {null, null, 32-bit code at `CODE_SEL`, data at `DATA_SEL`} at
-- `layout.gdt` (default 0x500) and sets cs/ds/es/fs/gs/ss, gdt,
-- `cr0 = PE|MP|ET|NE` (0x33), `cr4 = OSFXSR|OSXMMEXCPT`, `efer = 0`. This is the
-- state of the Linux 32-bit boot protocol. Registers are the caller's.
-- @param cpu a vCPU
-- @param vm a VM
-- @tparam[opt] table layout `gdt`; other keys are ignored
-- @treturn table `{gdt=, gdt_limit=, cr0=, cr4=, efer=}`
function x86.protected_mode(cpu, vm, layout)
  check_objs("protected_mode", cpu, vm)
  layout = layout or {}
  if type(layout) ~= "table" then
    error("protected_mode: bad argument #3 (layout table expected, got " .. type(layout) .. ")", 2)
  end
  local gdt_at = layout.gdt or x86.DEFAULT_LAYOUT.gdt
  check_addr("protected_mode", "gdt", gdt_at)
  local gdtr = write_gdt(vm, gdt_at, x86.FLAT_CODE32)
  local sregs = flat_sregs(x86.FLAT_CODE32)
  sregs.gdt = gdtr
  sregs.cr0 = x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE
  sregs.cr4 = x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT
  sregs.efer = 0
  cpu:set_sregs(sregs)
  return { gdt = gdt_at, gdt_limit = gdtr.limit, cr0 = sregs.cr0, cr4 = sregs.cr4, efer = 0 }
end

--- Load real-mode segments into a vCPU (for tiny 16-bit guests).
-- Sets cs/ds/es/fs/gs/ss to selector `seg`, base `seg << 4`, limit 0xffff
-- (cs type 0xb, the others type 3; present, s = 1, 16-bit). Only the segments
-- are set: a fresh vCPU is already in real mode (cr0.PE = 0), so with the
-- default `seg` = 0 the guest runs from `rip` in the first 64 KiB.
-- @param cpu a vCPU
-- @tparam[opt=0] integer seg the segment (paragraph) number, 0..0xffff
function x86.real_mode(cpu, seg)
  check_objs("real_mode", cpu, false)
  seg = seg or 0
  if not is_int(seg) or seg < 0 or seg > 0xffff then
    error("real_mode: bad argument #2 (segment must be an integer 0..0xffff)", 2)
  end
  local t = {}
  for _, r in ipairs{ "cs", "ds", "es", "fs", "gs", "ss" } do
    t[r] = {
      selector = seg, base = seg << 4, limit = 0xffff,
      type = r == "cs" and x86.SEG_CODE_RX or x86.SEG_DATA_RW,
      present = 1, dpl = 0, db = 0, s = 1, l = 0, g = 0, avl = 0,
    }
  end
  cpu:set_sregs(t)
end

return x86
