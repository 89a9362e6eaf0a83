--- The rock: `luarocks make` of luakvm-scm-1.rockspec into a temporary tree,
-- offline (--deps-mode=none: the only dependency is Lua itself), from a copy
-- of the checkout (luarocks builds in the source directory and would replace
-- the kvm/core.so `make` built); and the source rock `make rock` makes,
-- installed with `luarocks install` into another temporary tree with no rocks
-- server (--only-server=/nonexistent). Then, from another directory and with
-- only the tree on the module paths, the hello guest runs and `kvm-boot` starts.
local support = require "support"

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok, out, code
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local exists = support.exists

local function have(cmd)
  return (sh("command -v " .. cmd))
end

-- the C sources the rockspec builds
local function rockspec_sources()
  local env = {}
  local chunk = assert(loadfile("luakvm-scm-1.rockspec", "t", env))
  chunk()
  return env.build.modules["kvm.core"].sources, env.build.modules
end

-- the hello guest (examples/guests/hello.bin) through the installed modules
-- (hello_runs, below, runs it with only the tree on the module paths); prints
-- the kvm.core it loaded
local HELLO = [[
local guest_path = ...
local kvm = require "kvm"
local x86 = require "kvm.x86"
print("core: " .. package.searchpath("kvm.core", package.cpath))
local g = assert(io.open(guest_path, "rb")):read("a")
local vm <close> = assert(kvm.vm())
local ram = assert(vm:memory{ guest = 0, size = 2 << 20 })
ram:write(0x1000, g)
local cpu = assert(vm:vcpu(0))
x86.long_mode(cpu, vm, { ram_size = ram.size })
cpu:set_regs{ rip = 0x1000, rsp = 0x8000, rflags = 2 }
local out = {}
while true do
  local e = cpu:run{ timeout = 10 }
  if e.reason == "io" and e.port == 0x3f8 then out[#out + 1] = e.data
  else print("exit: " .. e.reason) break end
end
io.write(table.concat(out))
]]

-- run `args` (lua5.4 or an installed command) in `dir` with only `tree` on the module paths
local function lua_in(tree, dir, args)
  local env = ("LUA_PATH_5_4=%s LUA_CPATH_5_4=%s"):format(
    q(tree .. "/share/lua/5.4/?.lua;" .. tree .. "/share/lua/5.4/?/init.lua"),
    q(tree .. "/lib/lua/5.4/?.so"))
  return sh(("cd %s && env -u LUA_PATH -u LUA_CPATH %s %s"):format(q(dir), env, args))
end

-- the hello guest, run by the lua5.4 of the tree (modules and kvm.core from
-- it alone) from the folder dir: it finds the tree's kvm.core and says hello
local function hello_runs(tree, dir)
  support.need_kvm()
  if not exists("examples/guests/hello.bin") then
    pending("examples/guests/hello.bin is missing: run make") return
  end
  local script = dir .. "/hello_from_rock.lua"
  local f = assert(io.open(script, "w"))
  f:write(HELLO)
  f:close()
  local cwd = select(2, sh("pwd")):gsub("%s+$", "")
  local ok, out = lua_in(tree, dir, "lua5.4 " .. q(script) .. " " .. q(cwd .. "/examples/guests/hello.bin"))
  assert.is_true(ok, out)
  assert.matches("core: " .. tree .. "/lib/lua/5.4/kvm/core.so", out, 1, true)
  assert.matches("exit: hlt", out, 1, true)
  assert.matches("Hello, KVM!", out, 1, true)
end

describe("#rock the rock", function()
  it("builds every C file of csrc/ into kvm.core", function()
    local listed = {}
    for _, s in ipairs(rockspec_sources()) do listed[s] = true end
    local ok, out = sh("ls csrc/*.c")
    assert.is_true(ok, out)
    for f in out:gmatch("%S+") do
      assert.is_true(listed[f] == true, f .. " is not in luakvm-scm-1.rockspec's kvm.core sources")
    end
  end)

  it("installs every Lua module of lua/kvm/", function()
    local _, modules = rockspec_sources()
    local ok, out = sh("ls lua/kvm/*.lua")
    assert.is_true(ok, out)
    for f in out:gmatch("%S+") do
      local name = f:match("^lua/(.*)%.lua$"):gsub("/init$", ""):gsub("/", ".")
      assert.equal(f, modules[name], name .. " is not in luakvm-scm-1.rockspec's modules")
    end
  end)

  describe("installed with luarocks make into a temporary tree", function()
    if not have("luarocks") then pending("luarocks is not installed") return end
    local tmp, tree, src, built, log

    setup(function()
      local ok, out = sh("mktemp -d")
      assert(ok, out)
      tmp = out:gsub("%s+$", "")
      tree, src = tmp .. "/tree", tmp .. "/src"
      ok, out = sh(("mkdir -p %s && cp -r luakvm-scm-1.rockspec csrc lua examples %s/ && " ..
                    "find %s -name '*.o' -delete"):format(q(src), q(src), q(src)))
      assert(ok, out)
      built, log = sh(("cd %s && luarocks --lua-version=5.4 --tree=%s make --deps-mode=none " ..
                       "luakvm-scm-1.rockspec"):format(q(src), q(tree)))
    end)

    teardown(function()
      if tmp and tmp:match("^/tmp/") then sh("rm -rf " .. q(tmp)) end
    end)

    local function lua_in_tree(args) return lua_in(tree, tmp, args) end

    it("builds and installs offline", function()
      assert.is_true(built, log)
      assert.is_true(exists(tree .. "/lib/lua/5.4/kvm/core.so"), "kvm/core.so installed")
      for _, m in ipairs{ "init", "x86", "bootparams", "e820", "linux", "hostprofile" } do
        assert.is_true(exists(tree .. "/share/lua/5.4/kvm/" .. m .. ".lua"), "kvm/" .. m .. ".lua installed")
      end
    end)

    it("installs the kvm-boot command, which loads the modules from the tree", function()
      assert.is_true(built, log)
      local ok, out = sh("test -x " .. q(tree .. "/bin/kvm-boot"))
      assert.is_true(ok, "bin/kvm-boot is not an executable: " .. out)
      local _, usage, code = lua_in_tree(q(tree .. "/bin/kvm-boot") .. " --help")
      assert.equal(0, code, usage)
      assert.matches("usage: kvm-boot KERNEL", usage, 1, true)
    end)

    it("runs the hello guest from another directory", function()
      assert.is_true(built, log)
      hello_runs(tree, tmp)
    end)
  end)

  -- what a user does (README, "Install with luarocks"): make rock, then
  -- luarocks install of the source rock, with no rocks server to reach
  describe("made with make rock and installed from the source rock, offline", function()
    if not have("luarocks") then pending("luarocks is not installed") return end
    if not have("zip") or not have("git") or not sh("git rev-parse --is-inside-work-tree") then
      pending("make rock needs zip and a git checkout") return
    end
    local ROCK = "luakvm-scm-1.src.rock"
    local tmp, tree, made, made_log, built, log

    setup(function()
      local ok, out = sh("mktemp -d")
      assert(ok, out)
      tmp = out:gsub("%s+$", "")
      tree = tmp .. "/tree"
      made, made_log = sh("make -s rock && cp " .. ROCK .. " " .. q(tmp) .. "/")
      if made then
        built, log = sh(("cd %s && luarocks --lua-version=5.4 install ./%s --tree=%s " ..
                         "--only-server=/nonexistent"):format(q(tmp), ROCK, q(tree)))
      end
    end)

    teardown(function()
      if tmp and tmp:match("^/tmp/") then sh("rm -rf " .. q(tmp)) end
    end)

    it("packs the rockspec and a git archive of the checkout (top folder luakvm/)", function()
      assert.is_true(made, made_log)
      local ok, out = sh("unzip -Z1 " .. q(tmp .. "/" .. ROCK) .. " | sort")
      assert.is_true(ok, out)
      assert.equal("luakvm-scm-1.rockspec\nluakvm-scm-1.tar.gz\n", out)
      ok, out = sh("unzip -p " .. q(tmp .. "/" .. ROCK) .. " luakvm-scm-1.rockspec")
      assert.is_true(ok, out)
      assert.matches('url = "luakvm-scm-1.tar.gz"', out, 1, true)
      assert.not_matches("file://", out, 1, true)
      assert.not_matches("/work/", out, 1, true)
      ok, out = sh("cd " .. q(tmp) .. " && unzip -p " .. ROCK .. " luakvm-scm-1.tar.gz | tar tzf -")
      assert.is_true(ok, out)
      for _, f in ipairs{ "luakvm/luakvm-scm-1.rockspec", "luakvm/LICENSE", "luakvm/csrc/core.c",
                          "luakvm/lua/kvm/init.lua", "luakvm/examples/boot_linux.lua", "luakvm/spec/run.lua" } do
        assert.matches("\n" .. f:gsub("%p", "%%%0") .. "\n", "\n" .. out)
      end
      assert.not_matches("\n[^l][^\n]*", "\n" .. out)   -- everything under luakvm/
    end)

    it("installs offline", function()
      assert.is_true(made, made_log)
      assert.is_true(built, log)
      assert.matches("luakvm scm-1 is now installed", log, 1, true)
      assert.is_true(exists(tree .. "/lib/lua/5.4/kvm/core.so"), "kvm/core.so installed")
      assert.is_true(exists(tree .. "/share/lua/5.4/kvm/linux.lua"), "kvm/linux.lua installed")
    end)

    it("kvm-boot --help lists every option, --version prints the version", function()
      assert.is_true(built, log)
      local kvm_boot = q(tree .. "/bin/kvm-boot")
      local ok, out, code = lua_in(tree, tmp, kvm_boot .. " --help 2>/dev/null")
      assert.equal(0, code, out)
      assert.is_true(ok, out)
      assert.matches("^usage: kvm%-boot KERNEL %[options%]\n", out)
      for _, o in ipairs{ "--initrd FILE", "--mem SIZE", "--cmdline", "--append", "--timeout SECONDS",
                          "--status", "-h, --help", "--version" } do
        assert.matches("\n  " .. o, out, 1, true)
      end
      for _, status in ipairs{ "0", "5", "4", "124", "130", "3", "1", "2" } do
        assert.matches("\n  " .. status .. " +%S", out)
      end
      ok, out, code = lua_in(tree, tmp, kvm_boot .. " --version 2>/dev/null")
      assert.equal(0, code, out)
      assert.matches("^kvm%-boot %(luakvm%) %d[%w.]*\n$", out)
      ok, out, code = lua_in(tree, tmp, kvm_boot .. " --bogus")
      assert.is_not_true(ok)
      assert.equal(2, code, out)
      assert.equal("kvm-boot: unknown option --bogus (try: kvm-boot --help)\n", out)
    end)

    it("runs the hello guest from another directory", function()
      assert.is_true(built, log)
      hello_runs(tree, tmp)
    end)
  end)

  it("make doc writes a browsable reference: every module, the C classes, the examples", function()
    local ok, out = sh("make -s doc 2>&1")
    assert.is_true(ok, out)
    for _, page in ipairs{ "index.html", "classes/kvm.vm.html", "classes/kvm.vcpu.html",
                           "classes/kvm.memory.html", "classes/kvm.exit.html", "classes/kvm.virtio.html",
                           "modules/kvm.linux.html",
                           "modules/kvm.core.html", "examples/boot_linux.lua.html" } do
      assert.is_true(exists("doc/" .. page), "no doc/" .. page)
    end
    local f = assert(io.open("doc/classes/kvm.vm.html"))
    local vm_page = f:read("a")
    f:close()
    for _, m in ipairs{ "vm:serial", "vm:power", "vm:debugcon", "vm:on_io", "vm:legacy_ports", "vm:virtio_blk",
                            "vm:virtio_rng", "vm:virtio", "queue:pop", "chain:read", "chain:done" } do
      assert.matches(m, vm_page, 1, true)
    end
  end)
end)
