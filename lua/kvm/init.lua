--- luakvm: build and run KVM virtual machines from Lua 5.4.
-- `require "kvm"` gives the C core's functions (kvm.core) plus the Lua
-- modules, loaded on first use: `kvm.x86`, `kvm.bootparams`, `kvm.e820`,
-- `kvm.linux`.
--
--     local kvm = require "kvm"
--     local vm <close> = assert(kvm.vm())
--     local ram = vm:memory{guest = 0, size = 1 << 20}
--     local cpu = vm:vcpu(0)
--
-- @module kvm
local core = require "kvm.core"

local M = {}

--- Lua modules reachable as fields, loaded lazily.
local lazy = { x86 = "kvm.x86", bootparams = "kvm.bootparams", e820 = "kvm.e820",
               linux = "kvm.linux", hostprofile = "kvm.hostprofile", emulate = "kvm.emulate",
               debug = "kvm.debug", gdb = "kvm.gdb" }

setmetatable(M, {
  __index = function(t, k)
    local v = core[k]
    if v == nil and lazy[k] then v = require(lazy[k]) end
    if v ~= nil then rawset(t, k, v) end
    return v
  end,
})

--- Is /dev/kvm usable here? Returns true, or false and the reason.
-- @treturn boolean
-- @treturn ?string why not
function M.available()
  local v, err = core.api_version()
  if not v then return false, err end
  return true
end

return M
