-- The test command: `lua5.4 spec/run.lua [busted options]` from the repo root.
-- Runs every spec under spec/ with busted on Lua 5.4; the last line printed is
-- "N passed, N failed" and the exit status is non-zero on any failure.
local extra = {}
for i = 1, #arg do extra[#extra + 1] = arg[i] end
arg = { [0] = "spec/run.lua", "--ignore-lua", "--output=spec/summary_output.lua", "--helper=spec/helper.lua", table.unpack(extra) }
if #extra == 0 or extra[#extra]:match("^%-") then arg[#arg + 1] = "spec" end
require 'busted.runner'({ standalone = false })
