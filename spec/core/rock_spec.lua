--- The rock: `luarocks make` of luakvm-scm-1.rockspec into a temporary tree,
-- offline (--deps-mode=none: the only dependency is Lua itself), from a copy
-- of the checkout (luarocks builds in the source directory and would replace
-- the kvm/core.so `make` built). Then, from another directory and with only
-- the tree on the module paths, the hello guest runs and `kvm-boot` starts.
local support = require "support"

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok, out, code
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

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

    -- run lua5.4 in `tmp` with only the tree (and ./) on the module paths
    local function lua_in_tree(args)
      local env = ("LUA_PATH_5_4=%s LUA_CPATH_5_4=%s"):format(
        q(tree .. "/share/lua/5.4/?.lua;" .. tree .. "/share/lua/5.4/?/init.lua"),
        q(tree .. "/lib/lua/5.4/?.so"))
      return sh(("cd %s && env -u LUA_PATH -u LUA_CPATH %s %s"):format(q(tmp), env, args))
    end

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
      assert.equal(2, code, usage)
      assert.matches("usage: ", usage, 1, true)
    end)

    it("runs the hello guest from another directory", function()
      assert.is_true(built, log)
      support.need_kvm()
      if not exists("examples/guests/hello.bin") then
        pending("examples/guests/hello.bin is missing: run make") return
      end
      local script = tmp .. "/hello_from_rock.lua"
      local f = assert(io.open(script, "w"))
      f:write([[
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
]])
      f:close()
      local cwd = select(2, sh("pwd")):gsub("%s+$", "")
      local ok, out = lua_in_tree("lua5.4 " .. q(script) .. " " .. q(cwd .. "/examples/guests/hello.bin"))
      assert.is_true(ok, out)
      assert.matches("core: " .. tree .. "/lib/lua/5.4/kvm/core.so", out, 1, true)
      assert.matches("exit: hlt", out, 1, true)
      assert.matches("Hello, KVM!", out, 1, true)
    end)
  end)
end)
