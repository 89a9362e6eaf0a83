-- Loaded by busted before the specs: module paths for a checkout, and the
-- shared test helpers (spec/support.lua).
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath
