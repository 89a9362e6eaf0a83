-- kvm.cli: the examples' option parser, sizes, the console sink.
local cli = require "kvm.cli"

local OPTIONS = { initrd = "string", mem = "size", timeout = "number", status = "flag" }

describe("kvm.cli", function()
  it("parses options, flags and positional arguments", function()
    assert.same({ "vmlinux", initrd = "rd.gz", mem = 256 << 20, timeout = 2.5, status = true },
      cli.parse({ "--initrd", "rd.gz", "vmlinux", "--mem", "256M", "--status", "--timeout", "2.5" }, OPTIONS))
    assert.same({}, cli.parse({}, OPTIONS))
    assert.same({ help = true }, cli.parse({ "-h" }, OPTIONS))
    assert.same({ "a", "b", help = true }, cli.parse({ "a", "--help", "b" }, OPTIONS, 2))
  end)

  local bad = {
    { { "--initrd" }, "--initrd needs a value" },
    { { "--mem", "lots" }, "--mem: a size like 256M expected" },
    { { "--timeout", "soon" }, "--timeout: a number expected" },
    { { "--bogus" }, "unknown option --bogus" },
    { { "-x" }, "unknown option -x" },
    { { "a", "b" }, "one argument only (got b)" },
  }
  for _, c in ipairs(bad) do
    it("refuses " .. table.concat(c[1], " "), function()
      assert.same({ nil, c[2] }, { cli.parse(c[1], OPTIONS) })
    end)
  end

  it("takes --disk FILE[,ro] again and again, in order", function()
    local o = { disk = "disks", rng = "flag" }
    assert.same({ disk = { { path = "a.img", readonly = false }, { path = "b,c.img", readonly = true },
                           { path = "d.img", readonly = false } }, rng = true },
      cli.parse({ "--disk", "a.img", "--rng", "--disk", "b,c.img,ro", "--disk", "d.img,rw" }, o))
    assert.same({ nil, "--disk: FILE or FILE,ro expected" }, { cli.parse({ "--disk", ",ro" }, o) })
    assert.same({ nil, "--disk: FILE or FILE,ro expected" }, { cli.parse({ "--disk", "a.img,rx" }, o) })
    assert.same({ nil, "--disk needs a value" }, { cli.parse({ "--disk" }, o) })
  end)

  it("reads sizes", function()
    assert.same({ 4096, 64 << 10, 256 << 20, 1 << 30, 2 << 30 },
      { cli.size("4096"), cli.size("64k"), cli.size("256M"), cli.size("1G"), cli.size("2g") })
    assert.is_nil(cli.size("1T"))
    assert.is_nil(cli.size("-1M"))
    assert.is_nil(cli.size(""))
    assert.same({ 256 << 20, 64 << 10, 1 << 30, 4096 },
      { cli.size("256", "M"), cli.size("64K", "M"), cli.size("1g", "M"), cli.size("4096", "") })
  end)

  it("reads a \"mib\" option: a bare number counts MiB, suffixes still work", function()
    local o = { mem = "mib" }
    assert.same({ mem = 256 << 20 }, cli.parse({ "--mem", "256" }, o))
    assert.same({ mem = 1 << 30 }, cli.parse({ "--mem", "1G" }, o))
    assert.same({ mem = 512 << 10 }, cli.parse({ "--mem", "512K" }, o))
    assert.same({ nil, "--mem: a size like 256M expected" }, { cli.parse({ "--mem", "1T" }, o) })
  end)

  it("names a checkout's kernel files and tells whether a file exists", function()
    assert.same({ vmlinux = "./guest-kernel/vmlinux", bzimage = "./guest-kernel/bzImage",
                  initrd = "./guest-kernel/initramfs.cpio.gz" }, cli.guest_kernel("."))
    assert.is_true(cli.exists("spec/unit/cli_spec.lua"))
    assert.is_false(cli.exists("spec/unit/no such file"))
  end)

  it("keeps the console's last lines, across chunks", function()
    local c = cli.console{ keep = 2 }
    assert.equal("", c.last)
    c.output("one\r\ntw")
    assert.equal("one", c.last)
    c.output("o\n\nthree\nfo")
    assert.same({ "two", "three" }, c.lines)
    assert.equal("three", c.last)
  end)

  it("echoes to a file", function()
    local got = {}
    local file = { write = function(_, s) got[#got + 1] = s end, flush = function() end }
    cli.console{ echo = file }.output("hi\n")
    assert.same({ "hi\n" }, got)
  end)
end)
