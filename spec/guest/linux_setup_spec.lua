-- kvm.linux.setup on small crafted kernels: where everything lands, what the
-- zero page says, the registers; and the layout checks.
local support = require "support"
local linux = require "kvm.linux"
local bootparams = require "kvm.bootparams"


-- a bzImage: one setup sector after the boot sector, then the payload
local PAYLOAD = support.BZIMAGE_PAYLOAD
local bzimage = support.make_bzimage

-- an ELF64 x86-64 executable with one PT_LOAD at paddr (vaddr in the kernel's
-- high half), entering at paddr
local function elf(paddr, code, memsz)
  return support.make_elf{ entry = paddr, segments = {
    { paddr = paddr, vaddr = paddr | 0xffffffff80000000, data = code, memsz = memsz } } }
end

describe("#guest kvm.linux.setup", function()
  local files = {}
  local function tmpfile(bytes) return support.write_tmp(bytes, files) end
  teardown(function() for _, p in ipairs(files) do os.remove(p) end end)

  it("loads a bzImage at pref_address, fills the zero page and the registers", function()
    support.need_kvm()
    local kernel = tmpfile(bzimage())
    local initrd = tmpfile(("I"):rep(5000))
    local ctx = assert(linux.setup{ kernel = kernel, initrd = initrd, memory = 32 << 20,
      cmdline = "console=ttyS0 spec", profile = false, output = function() end })
    assert.equal("bzimage", ctx.kind)
    assert.equal(0x1000000 + 0x200, ctx.entry)
    assert.equal(PAYLOAD, ctx.vm:read(0x1000000, #PAYLOAD))
    local bp = bootparams.unpack(ctx.vm:read(ctx.layout.zero_page, 4096))
    assert.equal(0xff, bp.hdr.type_of_loader)
    assert.equal(0xaa55, bp.hdr.boot_flag)
    assert.equal(bootparams.HDRS_MAGIC, bp.hdr.header)
    assert.equal(ctx.layout.cmdline, bp.hdr.cmd_line_ptr)
    assert.equal("console=ttyS0 spec\0", ctx.vm:read(ctx.layout.cmdline, 19))
    assert.equal(ctx.initrd.addr, bp.hdr.ramdisk_image)
    assert.equal(5000, bp.hdr.ramdisk_size)
    assert.equal(0, ctx.initrd.addr & 0xfff)
    assert.equal(("I"):rep(5000), ctx.vm:read(ctx.initrd.addr, 5000))
    assert.is_true(ctx.initrd.addr + 5000 <= 32 << 20)
    assert.equal(1, bp.hdr.loadflags & bootparams.LOADED_HIGH)
    assert.equal(4, #bp.e820)
    assert.same({ addr = 0, size = 0x9fc00, type = 1 }, bp.e820[1])
    assert.same({ addr = 0x100000, size = (32 << 20) - 0x100000, type = 1 }, bp.e820[3])
    local r = ctx.cpu:regs()
    assert.equal(ctx.entry, r.rip)
    assert.equal(ctx.layout.zero_page, r.rsi)
    local s = ctx.cpu:sregs()
    assert.equal(0x10, s.cs.selector)
    assert.equal(1, s.cs.l)
    ctx.vm:close()
  end)

  it("makes the virtio devices written in Lua (opts.virtio) in their slots, after the others", function()
    support.need_kvm()
    local o = { type = "entropy", on_queue = function() end, config = "cfg" }
    local ctx = assert(linux.setup{ kernel = tmpfile(bzimage()), memory = 32 << 20, profile = false,
      output = function() end, rng = true, virtio = { o } })
    assert.equal(2, #ctx.virtio)
    assert.same({ "virtio-rng", 0xfeb00000, 16 }, { ctx.virtio[1]:info().kind, ctx.virtio[1]:info().base,
                                                   ctx.virtio[1]:info().irq })
    assert.same({ "virtio", 4, 0xfeb00200, 17 }, { ctx.virtio[2]:info().kind, ctx.virtio[2]:info().device_id,
                                                  ctx.virtio[2]:info().base, ctx.virtio[2]:info().irq })
    assert.equal(0x676663, ctx.virtio[2]:read(0x100, 4))
    assert.is_nil(o.base)                                  -- the options given are left as they were
    ctx.vm:close()
  end)

  it("loads an ELF at its physical address and enters at e_entry", function()
    support.need_kvm()
    local code = "\xb0\x07"             -- mov al, 7
              .. "\x66\xba\x01\x05"     -- mov dx, 0x501
              .. "\xee"                 -- out dx, al
              .. ("E"):rep(9)
    local kernel = tmpfile(elf(0x200000, code, 64))
    local ctx = assert(linux.setup{ kernel = kernel, memory = 32 << 20, profile = false,
      output = function() end })
    assert.equal("elf", ctx.kind)
    assert.equal(0x200000, ctx.entry)
    assert.equal(code .. ("\0"):rep(48), ctx.vm:read(0x200000, 64))
    -- the guest really starts there (hlt would not exit: the in-kernel LAPIC
    -- handles it), and reports through the debug-exit port
    ctx.vm:debug_exit()
    local e = ctx.cpu:run{ timeout = 5 }
    assert.equal("debug_exit", e.reason)
    assert.equal(7, e.code)
    ctx.vm:close()
  end)

  it("refuses a layout whose parts overlap or leave RAM, before any VM exists", function()
    local kernel = tmpfile(bzimage())
    local ctx, err = linux.setup{ kernel = kernel, memory = 32 << 20, profile = false,
      layout = { zero_page = 0x20000 } }
    assert.is_nil(ctx)
    local last = 0x20000 + #linux.DEFAULT_CMDLINE   -- the command line and its NUL
    assert.equal(("layout: zero_page (0x20000-0x20fff) overlaps cmdline (0x20000-0x%x)"):format(last), err)
    ctx, err = linux.setup{ kernel = kernel, memory = 32 << 20, profile = false,
      layout = { cmdline = 0x3000000 } }
    assert.is_nil(ctx)
    assert.equal(("layout: cmdline (0x3000000-0x%x) is outside guest RAM"):format(
      0x3000000 + #linux.DEFAULT_CMDLINE), err)
  end)

  it("checks the command line against cmdline_size", function()
    local kernel = tmpfile(bzimage{ cmdline_size = 16 })
    local ctx, err = linux.setup{ kernel = kernel, memory = 32 << 20, profile = false,
      cmdline = ("x"):rep(17) }
    assert.is_nil(ctx)
    assert.equal("command line is 17 bytes, the kernel accepts at most 16", err)
  end)
  it("applies a plan changed before apply, and a step replaced for one call", function()
    support.need_kvm()
    local kernel = tmpfile(elf(0x200000, "\xf4", 64))
    local plan = assert(linux.plan{ kernel = kernel, memory = 32 << 20, profile = false,
                                   output = function() end })
    plan.cmdline = "console=ttyS0 changed"
    local default = linux.STEPS.registers
    local ctx = assert(linux.apply(plan, { registers = function(c, p)
      default(c, p)
      c.cpu:set_regs{ rbx = 42 }
    end }))
    assert.equal("console=ttyS0 changed\0", ctx.vm:read(ctx.layout.cmdline, 22))
    assert.equal(42, ctx.cpu:regs().rbx)
    assert.equal(0x200000, ctx.cpu:regs().rip)
    assert.equal(default, linux.STEPS.registers)
    ctx.vm:close()
    ctx = assert(linux.setup{ kernel = kernel, memory = 32 << 20, profile = false, output = function() end })
    assert.equal(0, ctx.cpu:regs().rbx)
    ctx.vm:close()
  end)

  describe("a step or hook that fails leaves nothing open", function()
    local kernel
    setup(function() kernel = tmpfile(elf(0x200000, "\xf4", 64)) end)

    -- linux.setup with these options: the results of pcall, and the change
    -- in the fd count (garbage collected before, not in between: what setup
    -- made is closed, not collected)
    local function try(o)
      local opts = { kernel = kernel, memory = 32 << 20, profile = false, output = function() end }
      for k, v in pairs(o) do opts[k] = v end
      support.gc()
      local before = support.fd_count()
      local r = table.pack(pcall(linux.setup, opts))
      return r, support.fd_count() - before
    end

    it("a step that raises: the error goes on, the VM and vCPU are closed", function()
      support.need_kvm()
      local r, fds = try{ steps = { long_mode = function() error("no long mode today", 0) end } }
      assert.same({ false, "no long mode today", n = 2 }, r)
      assert.equal(0, fds)
    end)

    it("a step that returns nil and a message: setup returns them", function()
      support.need_kvm()
      local r, fds = try{ steps = { registers = function() return nil, "no registers today" end } }
      assert.same({ true, nil, "no registers today", n = 3 }, r)
      assert.equal(0, fds)
    end)

    it("a bootparams or cpuid hook that raises: the error goes on, before any VM", function()
      support.need_kvm()
      local boom = function() error("hook failed", 0) end
      for _, hook in ipairs{ "bootparams", "cpuid" } do
        local r, fds = try{ [hook] = boom }
        assert.same({ false, "hook failed", n = 2 }, r)
        assert.equal(0, fds, hook)
      end
    end)

    it("a bootparams hook that sets a field boot_params lacks: raises at the zero page, VM closed", function()
      support.need_kvm()
      local r, fds = try{ bootparams = function(bp) bp.no_such_field = 1 end }
      assert.is_false(r[1])
      assert.matches("bootparams.pack: unknown boot_params field 'no_such_field'", r[2], 1, true)
      assert.equal(0, fds)
    end)
  end)
end)
