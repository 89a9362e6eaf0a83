--- vm:load_elf(path [, opts]): the ELF loader's contract (csrc/elf.c).
-- ELF files are built here with string.pack, written to temporary files and
-- loaded into a VM with 2 MiB of memory at guest 0, pre-filled with 0xAA so
-- that every byte the loader writes, or must not write, shows.

local kvm = require "kvm.core"
local support = require "support"

local MEM = 2 << 20

local make_elf = support.make_elf

--- A 52-byte ELF32 header for i386 with no program headers.
local function make_elf32()
  return string.pack("<c4BBBBBc7I2I2I4I4I4I4I4I2I2I2I2I2I2",
    "\x7fELF", 1, 1, 1, 0, 0, string.rep("\0", 7),
    2, 3, 1, 0x1000, 52, 0, 0, 52, 32, 0, 40, 0, 0)
end

local tmpfiles = {}

local function write_tmp(bytes) return support.write_tmp(bytes, tmpfiles) end

describe("vm:load_elf", function()
  local vm, ram

  before_each(support.with_kvm(function()
    vm = assert(kvm.vm())
    ram = vm:memory{ guest = 0, size = MEM }
    ram:fill(0, MEM, 0xAA)
  end))

  after_each(function()
    if vm then vm:close() end
    vm, ram = nil, nil
    for _, p in ipairs(tmpfiles) do os.remove(p) end
    tmpfiles = {}
    collectgarbage()
  end)

  --- memory other than [from, from+len) still holds the 0xAA fill
  local function untouched_outside(from, len)
    assert.equal(string.rep("\xAA", from), ram:read(0, from))
    local after = from + len
    assert.equal(string.rep("\xAA", MEM - after), ram:read(after, MEM - after))
  end

  describe("loads", function()
    it("copies p_filesz bytes to p_paddr and zeroes the BSS", function()
      support.need_kvm()
      local path = write_tmp(make_elf{
        entry = 0x100000,
        segments = { { paddr = 0x100000, data = "hello, guest", memsz = 0x40 } },
      })
      local info = assert(vm:load_elf(path))
      assert.equal("hello, guest", ram:read(0x100000, 12))
      assert.equal(string.rep("\0", 0x40 - 12), ram:read(0x100000 + 12, 0x40 - 12))
      untouched_outside(0x100000, 0x40)
      assert.equal(0x100000, info.entry)
      assert.equal(0x100000, info.entry_phys)
      assert.equal(0x100000, info.low)
      assert.equal(0x100040, info.high)
      assert.equal(#make_elf{ entry = 0x100000,
        segments = { { paddr = 0x100000, data = "hello, guest", memsz = 0x40 } } },
        info.size)
    end)

    it("describes each PT_LOAD segment and skips the others", function()
      support.need_kvm()
      local path = write_tmp(make_elf{
        entry = 0x1000,
        segments = {
          { type = 4, paddr = 0x9000, data = "note" },              -- PT_NOTE
          { paddr = 0x1000, data = "\xf4", flags = 5, align = 0x1000 },
          { paddr = 0x4000, data = "data", memsz = 0x2000, flags = 6 },
        },
      })
      local info = assert(vm:load_elf(path))
      assert.equal(2, #info.segments)
      local s1, s2 = info.segments[1], info.segments[2]
      assert.same({ paddr = 0x1000, vaddr = 0x1000, offset = s1.offset,
        filesz = 1, memsz = 1, flags = 5, align = 0x1000, index = 1 }, s1)
      assert.same({ paddr = 0x4000, vaddr = 0x4000, offset = s2.offset,
        filesz = 4, memsz = 0x2000, flags = 6, align = 16, index = 2 }, s2)
      assert.equal(0, s1.offset & 15)
      assert.is_true(s2.offset > s1.offset)
      assert.equal("\xf4", ram:read(0x1000, 1))
      assert.equal("data", ram:read(0x4000, 4))
      assert.equal(string.rep("\xAA", 4), ram:read(0x9000, 4))  -- note not loaded
      assert.equal(0x1000, info.low)
      assert.equal(0x6000, info.high)
    end)

    it("returns a virtual e_entry as a round-tripping integer and its physical address", function()
      support.need_kvm()
      local path = write_tmp(make_elf{
        entry = 0xffffffff81000010,
        segments = { { vaddr = 0xffffffff81000000, paddr = 0x100000,
                       data = string.rep("\x90", 32) } },
      })
      local info = assert(vm:load_elf(path))
      assert.equal(0xffffffff81000010, info.entry)
      assert.is_true(info.entry < 0)
      assert.equal(0x100010, info.entry_phys)
      assert.equal(0xffffffff81000000, info.segments[1].vaddr)
      assert.equal(0x100000, info.segments[1].paddr)
      assert.equal(string.rep("\x90", 32), ram:read(0x100000, 32))
    end)

    it("takes a physical e_entry as it is (x86 vmlinux: e_entry = 0x1000000)", function()
      support.need_kvm()
      local path = write_tmp(make_elf{
        entry = 0x100000,
        segments = {
          { vaddr = 0xffffffff81000000, paddr = 0x100000, data = "text" },
          { vaddr = 0, paddr = 0x110000, data = "percpu" },
        },
      })
      local info = assert(vm:load_elf(path))
      assert.equal(0x100000, info.entry)
      assert.equal(0x100000, info.entry_phys)
    end)

    it("leaves entry_phys nil when no segment holds e_entry", function()
      support.need_kvm()
      local path = write_tmp(make_elf{
        entry = 0x500000, segments = { { paddr = 0x1000, data = "x" } },
      })
      local info = assert(vm:load_elf(path))
      assert.equal(0x500000, info.entry)
      assert.is_nil(info.entry_phys)
    end)

    it("loads at p_vaddr with physical = false", function()
      support.need_kvm()
      local path = write_tmp(make_elf{
        entry = 0x3000,
        segments = { { vaddr = 0x3000, paddr = 0x100000, data = "virt" } },
      })
      local info = assert(vm:load_elf(path, { physical = false }))
      assert.equal("virt", ram:read(0x3000, 4))
      untouched_outside(0x3000, 4)
      assert.equal(0x3000, info.low)
      assert.equal(0x3004, info.high)
      assert.equal(0x100000, info.entry_phys)
    end)

    it("accepts ET_DYN, segments that touch, and BSS-only segments", function()
      support.need_kvm()
      local path = write_tmp(make_elf{
        type = 3,
        segments = {
          { paddr = 0x2000, data = "AB", memsz = 0x1000 },
          { paddr = 0x3000, data = "", memsz = 0x1000 },
          { paddr = 0x1000, data = string.rep("C", 0x1000) },
        },
      })
      local info = assert(vm:load_elf(path))
      assert.equal(0x1000, info.low)
      assert.equal(0x4000, info.high)
      assert.equal(string.rep("C", 0x1000) .. "AB" .. string.rep("\0", 0x1ffe),
        ram:read(0x1000, 0x3000))
      untouched_outside(0x1000, 0x3000)
    end)

    it("loads a segment that ends exactly at the end of guest memory", function()
      support.need_kvm()
      local path = write_tmp(make_elf{
        segments = { { paddr = MEM - 0x100, data = "end", memsz = 0x100 } },
      })
      assert.is_table(vm:load_elf(path))
      assert.equal("end" .. string.rep("\0", 0xfd), ram:read(MEM - 0x100, 0x100))
    end)
  end)

  describe("bad files return nil, message and touch nothing", function()
    -- each case: a file's bytes (or a function giving a path) and the message
    -- after "path: "; %d in the message is the file size, formatted in hex
    local cases = {
      { "not an ELF file", "this is not an ELF file, just text\n", "not an ELF file" },
      { "an empty file", "", "not an ELF file" },
      { "a file shorter than the magic", "\x7fEL", "not an ELF file" },
      { "ELF32", make_elf32(), "32-bit ELF, not ELF64" },
      { "a bad class", make_elf{ class = 7 }, "bad ELF class 7" },
      { "big-endian", make_elf{ data = 2 }, "big-endian ELF, not little-endian" },
      { "a bad data encoding", make_elf{ data = 0 }, "bad ELF data encoding 0" },
      { "the wrong machine",
        make_elf{ machine = 40, segments = { { paddr = 0x1000, data = "x" } } },
        "ELF64 for machine 40, not x86-64" },
      { "a relocatable object", make_elf{ type = 1 },
        "ELF type 1 (relocatable), not an executable" },
      { "a core file", make_elf{ type = 4 }, "ELF type 4 (core file), not an executable" },
      { "a truncated header (in e_ident)", make_elf{ truncate = 10 },
        "truncated ELF header (10 bytes)" },
      { "a truncated header", make_elf{ truncate = 40 }, "truncated ELF header (40 bytes)" },
      { "no program headers", make_elf{}, "no program headers" },
      { "a wrong program header size",
        make_elf{ phentsize = 32, segments = { { paddr = 0x1000, data = "x" } } },
        "program header size 32, not 56" },
      { "program headers past the end of the file",
        make_elf{ phoff = 0x10000, segments = { { paddr = 0x1000, data = "x" } } },
        "truncated: program headers end at 0x10038 past the end of the file (0x%x bytes)" },
      { "program headers cut short",
        make_elf{ phnum = 3, segments = { { paddr = 0x1000, data = "x" } } },
        "truncated: program headers end at 0xe8 past the end of the file (0x%x bytes)" },
      { "program headers whose offset wraps",
        make_elf{ phoff = -8, segments = { { paddr = 0x1000, data = "x" } } },
        "truncated: program headers (offset 0xfffffffffffffff8, 1 entries) are past the end of the file" },
      { "no loadable segments",
        make_elf{ segments = { { type = 4, paddr = 0x1000, data = "note" } } },
        "no loadable segments" },
      { "a segment past the end of the file",
        make_elf{ segments = { { paddr = 0x1000, data = "x" },
                               { paddr = 0x2000, data = "abcd", filesz = 0x1000 } } },
        "truncated: segment 1 ends at 0x10c0 past the end of the file (0x%x bytes)" },
      { "a segment whose offset wraps",
        make_elf{ segments = { { paddr = 0x1000, data = "x", offset = -1, filesz = 2 } } },
        "truncated: segment 0 (offset 0xffffffffffffffff + size 0x2) is past the end of the file" },
      { "p_filesz > p_memsz",
        make_elf{ segments = { { paddr = 0x1000, data = "0123456789abcdef", memsz = 8 } } },
        "segment 0: file size 0x10 is larger than memory size 0x8" },
      { "a huge p_memsz",
        make_elf{ segments = { { paddr = 0x1000, data = "x", memsz = 1 << 44 } } },
        "segment 0: memory size 0x100000000000 is too large" },
      { "an all-ones p_memsz",
        make_elf{ segments = { { paddr = 0x1000, data = "x", memsz = -1 } } },
        "segment 0: memory size 0xffffffffffffffff is too large" },
      { "a segment that wraps around the address space",
        make_elf{ segments = { { paddr = -0x1000, data = "x", memsz = 0x2000 } } },
        "segment 0 (0xfffffffffffff000 + 0x2000) wraps around the address space" },
      { "a segment outside guest memory",
        make_elf{ segments = { { paddr = 0x1000, data = "ok" },
                               { paddr = 0x1000000, data = "x", memsz = 0x2000000 } } },
        "segment 1 (0x1000000-0x3000000) is outside guest memory" },
      { "a segment running past the end of guest memory",
        make_elf{ segments = { { paddr = MEM - 0x10, data = "x", memsz = 0x20 } } },
        "segment 0 (0x1ffff0-0x200010) is outside guest memory" },
      { "a kernel-style segment loaded virtually",
        make_elf{ segments = { { vaddr = 0xffffffff81000000, paddr = 0x1000, data = "x" } } },
        "segment 0 (0xffffffff81000000-0xffffffff81000001) is outside guest memory",
        { physical = false } },
      { "overlapping segments",
        make_elf{ segments = { { paddr = 0x1000, data = "aa", memsz = 0x2000 },
                               { paddr = 0x2000, data = "bb" } } },
        "segments 0 and 1 overlap" },
      { "segments overlapping out of order",
        make_elf{ segments = { { paddr = 0x8000, data = "a" },
                               { paddr = 0x1000, data = "b" },
                               { paddr = 0x7000, data = "c", memsz = 0x1001 } } },
        "segments 0 and 2 overlap" },
      { "segments at the same address",
        make_elf{ segments = { { paddr = 0x1000, data = "a" },
                               { paddr = 0x1000, data = "b" } } },
        "segments 0 and 1 overlap" },
    }

    for _, c in ipairs(cases) do
      local name, bytes, msg, opts = c[1], c[2], c[3], c[4]
      it(name, function()
        support.need_kvm()
        local path = write_tmp(bytes)
        local info, err, errno = vm:load_elf(path, opts)
        assert.is_nil(info)
        assert.equal(path .. ": " .. msg:format(#bytes), err)
        assert.is_nil(errno)
        untouched_outside(0, 0)
      end)
    end

    it("a missing file gives the system error and errno", function()
      support.need_kvm()
      local path = os.tmpname()
      os.remove(path)
      local info, err, errno = vm:load_elf(path)
      assert.is_nil(info)
      assert.equal(path .. ": No such file or directory", err)
      assert.equal(2, errno)   -- ENOENT
      untouched_outside(0, 0)
    end)

    it("a directory gives the system error and errno", function()
      support.need_kvm()
      local info, err, errno = vm:load_elf("/")
      assert.is_nil(info)
      assert.equal("/: Is a directory", err)
      assert.equal(21, errno)  -- EISDIR
    end)

    it("a device is not a regular file", function()
      support.need_kvm()
      local info, err, errno = vm:load_elf("/dev/null")
      assert.is_nil(info)
      assert.equal("/dev/null: not a regular file", err)
      assert.is_nil(errno)
    end)

    it("no bytes land when only the last segment is bad", function()
      support.need_kvm()
      local path = write_tmp(make_elf{ segments = {
        { paddr = 0x1000, data = "first" },
        { paddr = 0x2000, data = "second", memsz = 0x100 },
        { paddr = 0x3000, data = "third", memsz = 2 },
      } })
      local info, err = vm:load_elf(path)
      assert.is_nil(info)
      assert.equal(path .. ": segment 2: file size 0x5 is larger than memory size 0x2", err)
      untouched_outside(0, 0)
    end)

    it("more than 64 loadable segments", function()
      support.need_kvm()
      local segs = {}
      for i = 1, 65 do segs[i] = { paddr = i * 0x1000, data = "s" } end
      local path = write_tmp(make_elf{ segments = segs })
      local info, err = vm:load_elf(path)
      assert.is_nil(info)
      assert.equal(path .. ": more than 64 loadable segments", err)
      untouched_outside(0, 0)
      segs[65] = nil
      assert.equal(64, #assert(vm:load_elf(write_tmp(make_elf{ segments = segs }))).segments)
    end)
  end)

  describe("programmer errors raise", function()
    local path
    before_each(function()
      path = write_tmp(make_elf{ segments = { { paddr = 0x1000, data = "x" } } })
    end)

    it("without a path", function()
      support.need_kvm()
      assert.has_error(function() vm:load_elf() end)
      assert.has_error(function() vm:load_elf({}) end)
    end)

    it("with opts that are not a table", function()
      support.need_kvm()
      assert.has_error(function() vm:load_elf(path, 5) end)
      assert.has_error(function() vm:load_elf(path, "physical") end)
    end)

    it("with a non-boolean 'physical'", function()
      support.need_kvm()
      local ok, err = pcall(vm.load_elf, vm, path, { physical = "yes" })
      assert.is_false(ok)
      assert.matches("'physical' must be a boolean", err, 1, true)
      assert.equal(string.rep("\xAA", 1), ram:read(0x1000, 1))
    end)

    it("on something that is not a VM", function()
      support.need_kvm()
      assert.has_error(function() vm.load_elf(ram, path) end)
      assert.has_error(function() vm.load_elf(nil, path) end)
    end)

    it("on a closed VM", function()
      support.need_kvm()
      local other = assert(kvm.vm())
      other:close()
      local ok, err = pcall(other.load_elf, other, path)
      assert.is_false(ok)
      assert.matches("closed", err, 1, true)
    end)
  end)

  describe("a real vmlinux", function()
    local VMLINUX = "guest-kernel/vmlinux"
    local f = io.open(VMLINUX, "rb")
    if not f then
      pending("skipped: no " .. VMLINUX)
      return
    end

    it("loads its PT_LOAD segments at their physical addresses", function()
      support.need_kvm()
      -- the file says how much memory it needs
      local ehdr = f:read(64)
      local phoff, phentsize, phnum =
        string.unpack("<I8", ehdr, 33), string.unpack("<I2", ehdr, 55),
        string.unpack("<I2", ehdr, 57)
      local high, loads = 0, {}
      for i = 0, phnum - 1 do
        f:seek("set", phoff + i * phentsize)
        local ptype, _, off, _, paddr, filesz, memsz =
          string.unpack("<I4I4I8I8I8I8I8", f:read(56))
        if ptype == 1 then
          loads[#loads + 1] = { off = off, paddr = paddr, filesz = filesz }
          if paddr + memsz > high then high = paddr + memsz end
        end
      end
      local big = assert(kvm.vm())
      local size = (high + 0xfffff) & ~0xfffff
      local bigram = big:memory{ guest = 0, size = size }
      local info = assert(big:load_elf(VMLINUX))
      assert.equal(#loads, #info.segments)
      assert.equal(high, info.high)
      assert.equal(f:seek("end"), info.size)
      assert.equal("integer", math.type(info.entry_phys))
      assert.is_true(info.entry_phys >= info.low and info.entry_phys < info.high)
      for i, l in ipairs(loads) do
        assert.equal(l.paddr, info.segments[i].paddr)
        local n = math.min(l.filesz, 4096)
        f:seek("set", l.off)
        assert.equal(f:read(n), bigram:read(l.paddr, n))
      end
      big:close()
      f:close()
    end)
  end)
end)
