-- snapshot (after node.lua): KEYS the node set; ARGV settle seconds, node key pattern, alloc pattern,
-- recent pattern. Per node: id, then cpus, memory, state, cpu, ram, alloc_cpu, alloc_memory, alloc_n,
-- and the reserved cpu and memory (as strings: Lua numbers come back as integers).
local settle = tonumber(ARGV[1])
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key, row = read_node(ARGV[2], id)
  local cpu, memory = reserved(key, row, id, settle, ARGV[3], ARGV[4], false)
  row[9] = tostring(cpu)
  row[10] = tostring(memory)
  row[11] = nil
  table.insert(row, 1, id)
  out[#out + 1] = row
end
return out
