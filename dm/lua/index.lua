-- index (after node.lua): bring nodes' entries in the placement index up to date, after a
-- change of their sample, allocations or state. KEYS the index, the settle time placement uses;
-- ARGV node key pattern, alloc pattern, recent pattern, settle if placement has set none, then
-- the node ids.
local settle = tonumber(redis.call('GET', KEYS[2]) or ARGV[4])
for i = 5, #ARGV do
  reindex(KEYS[1], ARGV[1], ARGV[2], ARGV[3], settle, ARGV[i])
end
return #ARGV - 4
