--- kvm.memory (csrc/mem.c): a host mapping registered as guest RAM.
local support = require "support"

describe("kvm.memory", function()
  local kvm = require "kvm"
  local err, merr = support.err, support.merr
  local SIZE = 0x10000

  local vm, ram
  before_each(support.with_kvm(function()
    vm = assert(kvm.vm())
    ram = vm:memory{ guest = 0x100000, size = SIZE }
  end))
  after_each(support.with_kvm(function() vm:close() end))

  describe("fields and tostring", function()
    it("tostring: slot and range, readonly, or (closed)", function()
      support.need_kvm()
      assert.equal("kvm.memory (slot 0, 0x100000-0x10ffff)", tostring(ram))
      local ro = vm:memory{ guest = 0, size = 0x1000, readonly = true }
      assert.equal("kvm.memory (slot 1, 0x0-0xfff, readonly)", tostring(ro))
      ram:close()
      assert.equal("kvm.memory (closed)", tostring(ram))
    end)

    it("guest, size, slot, readonly, closed; unknown keys are nil", function()
      support.need_kvm()
      assert.equal(0x100000, ram.guest)
      assert.equal(SIZE, ram.size)
      assert.equal(0, ram.slot)
      assert.is_false(ram.readonly)
      assert.is_false(ram.closed)
      assert.is_nil(ram.nonsense)
      ram:close()
      assert.is_true(ram.closed)
    end)

    it("starts zeroed", function()
      support.need_kvm()
      assert.equal(string.rep("\0", SIZE), ram:read(0, SIZE))
    end)
  end)

  describe("read, write, u8..u64", function()
    it("read returns what write wrote, and the VM sees it at guest + off", function()
      support.need_kvm()
      ram:write(0x10, "hello")
      assert.equal("hello", ram:read(0x10, 5))
      assert.equal("hello", vm:read(0x100010, 5))
      vm:write(0x100020, "world")
      assert.equal("world", ram:read(0x20, 5))
    end)

    local values = {
      { "u8", 1, 0 }, { "u8", 1, 0xff }, { "u8", 1, 0x7f },
      { "u16", 2, 0xffff }, { "u16", 2, 0x1234 },
      { "u32", 4, 0xffffffff }, { "u32", 4, 0x89abcdef },
      { "u64", 8, 0 }, { "u64", 8, 1 }, { "u64", 8, 0xffffffff81000000 },
      { "u64", 8, math.maxinteger }, { "u64", 8, math.mininteger }, { "u64", 8, -1 },
    }
    for _, c in ipairs(values) do
      it(("%s round-trips 0x%x"):format(c[1], c[3]), function()
        support.need_kvm()
        local m, n, v = c[1], c[2], c[3]
        ram[m](ram, 0x40, v)
        assert.equal(v, ram[m](ram, 0x40))
        assert.equal(string.pack(n == 8 and "<i8" or "<I" .. n, v), ram:read(0x40, n))
      end)
    end

    -- a narrow store takes -2^(n-1) .. 2^n - 1, a load is always unsigned
    local signed = { { "u8", -1, 0xff }, { "u8", -128, 0x80 }, { "u16", -1, 0xffff },
                     { "u32", -1, 0xffffffff }, { "u32", -0x80000000, 0x80000000 } }
    for _, c in ipairs(signed) do
      it(("%s stores %d and reads back 0x%x"):format(c[1], c[2], c[3]), function()
        support.need_kvm()
        ram[c[1]](ram, 0, c[2])
        assert.equal(c[3], ram[c[1]](ram, 0))
      end)
    end

    it("a narrow store leaves the neighbours alone", function()
      support.need_kvm()
      ram:write(0, "\x11\x22\x33\x44\x55\x66\x77\x88\x99")
      ram:u16(1, 0xaabb)
      assert.equal("\x11\xbb\xaa\x44\x55\x66\x77\x88\x99", ram:read(0, 9))
    end)

    local at_end = {
      { "read", { SIZE, 0 }, "" },
      { "read", { SIZE - 1, 1 }, "\0" },
      { "u64", { SIZE - 8 }, 0 },
      { "u8", { SIZE - 1 }, 0 },
    }
    for _, c in ipairs(at_end) do
      it(("%s(%s) exactly at the end is fine"):format(c[1], table.concat(c[2], ", ")), function()
        support.need_kvm()
        assert.equal(c[3], ram[c[1]](ram, table.unpack(c[2])))
      end)
    end

    it("write of an empty string at the very end is fine", function()
      support.need_kvm()
      ram:write(SIZE, "")
      ram:fill(SIZE, 0, 1)
    end)

    local out_of_range = {
      { "read", { -1, 1 }, "bad argument #1 to 'read' (negative offset)" },
      { "read", { math.mininteger, 1 }, "bad argument #1 to 'read' (negative offset)" },
      { "read", { 0, -1 }, "bad argument #2 to 'read' (negative length)" },
      { "read", { SIZE, 1 }, "range 0x10000+0x1 is outside the region (size 0x10000)" },
      { "read", { 0, SIZE + 1 }, "range 0x0+0x10001 is outside the region (size 0x10000)" },
      { "read", { math.maxinteger, 1 }, "range 0x7fffffffffffffff+0x1 is outside the region (size 0x10000)" },
      { "read", { math.maxinteger, math.maxinteger }, "range 0x7fffffffffffffff+0x7fffffffffffffff is outside the region (size 0x10000)" },
      { "read", { 1, math.maxinteger }, "range 0x1+0x7fffffffffffffff is outside the region (size 0x10000)" },
      { "write", { -1, "x" }, "bad argument #1 to 'write' (negative offset)" },
      { "write", { SIZE - 1, "xy" }, "range 0xffff+0x2 is outside the region (size 0x10000)" },
      { "write", { math.maxinteger, "x" }, "range 0x7fffffffffffffff+0x1 is outside the region (size 0x10000)" },
      { "fill", { SIZE - 1, 2, 0 }, "range 0xffff+0x2 is outside the region (size 0x10000)" },
      { "fill", { -1, 1, 0 }, "bad argument #1 to 'fill' (negative offset)" },
      { "fill", { 0, -1, 0 }, "bad argument #2 to 'fill' (negative length)" },
      { "fill", { 0, 1, 256 }, "bad argument #3 to 'fill' (byte out of range)" },
      { "fill", { 0, 1, -1 }, "bad argument #3 to 'fill' (byte out of range)" },
      { "u8", { SIZE }, "range 0x10000+0x1 is outside the region (size 0x10000)" },
      { "u16", { SIZE - 1 }, "range 0xffff+0x2 is outside the region (size 0x10000)" },
      { "u32", { SIZE - 3 }, "range 0xfffd+0x4 is outside the region (size 0x10000)" },
      { "u64", { SIZE - 7 }, "range 0xfff9+0x8 is outside the region (size 0x10000)" },
      { "u64", { -8 }, "bad argument #1 to 'u64' (negative offset)" },
      { "u64", { math.maxinteger - 3 }, "range 0x7ffffffffffffffc+0x8 is outside the region (size 0x10000)" },
      { "u8", { 0, 256 }, "bad argument #2 to 'u8' (value does not fit)" },
      { "u8", { 0, -129 }, "bad argument #2 to 'u8' (value does not fit)" },
      { "u16", { 0, 0x10000 }, "bad argument #2 to 'u16' (value does not fit)" },
      { "u32", { 0, 0x100000000 }, "bad argument #2 to 'u32' (value does not fit)" },
      { "u32", { 0, 1.5 }, "bad argument #2 to 'u32' (number has no integer representation)" },
      { "read", { 0.5, 1 }, "bad argument #1 to 'read' (number has no integer representation)" },
    }
    for _, c in ipairs(out_of_range) do
      local shown = {}
      for i, a in ipairs(c[2]) do shown[i] = type(a) == "string" and ("%q"):format(a) or tostring(a) end
      it(("%s(%s) raises"):format(c[1], table.concat(shown, ", ")), function()
        support.need_kvm()
        assert.equal(c[3], merr(ram, c[1], table.unpack(c[2])))
      end)
    end
  end)

  it("fill sets len bytes to byte", function()
    support.need_kvm()
    ram:fill(0x100, 16, 0xcc)
    assert.equal("\0" .. string.rep("\xcc", 16) .. "\0", ram:read(0xff, 18))
    ram:fill(0, SIZE, 0x5a)
    assert.equal(string.rep("Z", SIZE), ram:read(0, SIZE))
  end)

  describe("load", function()
    local path
    before_each(function()
      path = os.tmpname()
      local f = assert(io.open(path, "wb"))
      f:write("0123456789abcdef")
      f:close()
    end)
    after_each(function() os.remove(path) end)

    it("copies a file into the region and returns the bytes loaded", function()
      support.need_kvm()
      assert.equal(16, ram:load(0x100, path))
      assert.equal("0123456789abcdef", ram:read(0x100, 16))
    end)

    it("takes a file offset and a length", function()
      support.need_kvm()
      assert.equal(12, ram:load(0, path, 4))
      assert.equal("456789abcdef", ram:read(0, 12))
      assert.equal(3, ram:load(0x200, path, 10, 3))
      assert.equal("abc\0", ram:read(0x200, 4))
      assert.equal(0, ram:load(0x300, path, 16))
    end)

    it("fits exactly at the end of the region", function()
      support.need_kvm()
      assert.equal(16, ram:load(SIZE - 16, path))
      assert.equal("0123456789abcdef", ram:read(SIZE - 16, 16))
    end)

    it("a missing file: nil, message, errno", function()
      support.need_kvm()
      local r, msg, errno = ram:load(0, "/nonexistent/file")
      assert.is_nil(r)
      assert.equal("/nonexistent/file: No such file or directory", msg)
      assert.equal(2, errno)
    end)

    it("a directory: nil, message, EISDIR", function()
      support.need_kvm()
      local r, msg, errno = ram:load(0, "/tmp")
      assert.is_nil(r)
      assert.equal("/tmp: Is a directory", msg)
      assert.equal(21, errno)
    end)

    -- BUG (csrc/mem.c l_mem_load): for a file that is neither regular nor a
    -- directory the message is strerror() of a stale errno (seen: "No such file
    -- or directory") instead of "not a regular file".
    it("a device: nil, 'not a regular file' [core bug: stale errno]", function()
      support.need_kvm()
      local r, msg = ram:load(0, "/dev/null")
      assert.is_nil(r)
      assert.equal("/dev/null: not a regular file", msg)
    end)

    local too_big = {
      { { SIZE - 15 }, "file does not fit in the region (16 bytes at offset 0xfff1, region size 0x10000)" },
      { { SIZE + 1 }, "file does not fit in the region (16 bytes at offset 0x10001, region size 0x10000)" },
      { { 0, 17 }, "file offset is past the end of the file (0 bytes at offset 0x0, region size 0x10000)" },
      { { 0, 8, 9 }, "file is shorter than the length asked for (9 bytes at offset 0x0, region size 0x10000)" },
      { { math.maxinteger }, "file does not fit in the region (16 bytes at offset 0x7fffffffffffffff, region size 0x10000)" },
    }
    for _, c in ipairs(too_big) do
      it("refuses: " .. c[2], function()
        support.need_kvm()
        local off, foff, len = table.unpack(c[1])
        local r, msg, errno = ram:load(off, path, foff, len)
        assert.is_nil(r)
        assert.equal(path .. ": " .. c[2], msg)
        assert.equal(22, errno)
        assert.equal(string.rep("\0", SIZE), ram:read(0, SIZE))   -- nothing written
      end)
    end

    local bad = {
      { { -1 }, "bad argument #1 to 'load' (negative offset)" },
      { { 0, nil, -1 }, "bad argument #3 to 'load' (negative file offset)" },
      { { 0, nil, 0, -2 }, "bad argument #4 to 'load' (negative length)" },
    }
    for _, c in ipairs(bad) do
      it(c[2], function()
        support.need_kvm()
        local off, _, foff, len = table.unpack(c[1], 1, 4)
        assert.equal(c[2], merr(ram, "load", off, path, foff, len))
      end)
    end
  end)

  describe("close", function()
    it("is idempotent and unregisters the range", function()
      support.need_kvm()
      ram:write(0, "x")
      ram:close()
      ram:close()
      assert.equal("guest range 0x100000+0x1 is outside guest memory", err(function() vm:read(0x100000, 1) end))
      assert.equal(0, #vm:regions())
    end)

    local methods = { { "read", 0, 1 }, { "write", 0, "x" }, { "fill", 0, 1, 0 }, { "load", 0, "/dev/null" },
                      { "u8", 0 }, { "u16", 0 }, { "u32", 0 }, { "u64", 0, 1 }, { "dirty_pages" } }
    for _, c in ipairs(methods) do
      it(c[1] .. " on a closed memory raises", function()
        support.need_kvm()
        ram:close()
        assert.equal("attempt to use a closed kvm.memory", merr(ram, c[1], table.unpack(c, 2)))
      end)
    end

    it("a <close> variable closes it", function()
      support.need_kvm()
      local keep
      do
        local r <close> = vm:memory{ guest = 0, size = 0x1000 }
        keep = r
      end
      assert.is_true(keep.closed)
      assert.equal(1, #vm:regions())
    end)

    it("after the VM is closed, close still unmaps (no error)", function()
      support.need_kvm()
      vm:close()
      ram:write(0, "y")
      ram:close()
      assert.is_true(ram.closed)
    end)
  end)

  describe("dirty_pages", function()
    it("needs dirty_log = true", function()
      support.need_kvm()
      assert.equal("memory region was created without dirty_log = true", err(function() ram:dirty_pages() end))
    end)

    it("is an empty list when nothing ran", function()
      support.need_kvm()
      local d = vm:memory{ guest = 0, size = 0x4000, dirty_log = true }
      assert.same({}, d:dirty_pages())
    end)

    it("on a closed VM raises", function()
      support.need_kvm()
      local d = vm:memory{ guest = 0, size = 0x4000, dirty_log = true }
      vm:close()
      assert.equal("attempt to use a closed kvm.vm", err(function() d:dirty_pages() end))
    end)
  end)
end)
