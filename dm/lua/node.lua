-- the prelude of snapshot.lua and decide.lua: read a node, compute and trim its reserved demand
-- a node's hash fields placement reads: cpus, memory, state, cpu, ram, alloc_cpu,
-- alloc_memory, alloc_n, ts, res_cpu, res_memory
local function read_node(pattern, id)
  local key = string.gsub(pattern, '{}', id)
  return key, redis.call('HMGET', key, 'cpus', 'memory', 'state', 'cpu', 'ram',
                         'alloc_cpu', 'alloc_memory', 'alloc_n', 'ts', 'res_cpu', 'res_memory')
end
-- the node's reserved cpu and memory: what was placed after its last sample minus settle.
-- With ``trim`` (placement, which writes anyway) allocations older than that leave the recent
-- set and its totals, so the cost grows only with what was placed since; without it (a snapshot
-- for a reader) it is a look that changes nothing.
local function reserved(key, row, id, settle, alloc_pattern, recent_pattern, trim)
  local ts = tonumber(row[9] or '0') or 0
  local cpu, memory = tonumber(row[10] or '0') or 0, tonumber(row[11] or '0') or 0
  local rkey = string.gsub(recent_pattern, '{}', id)
  local settled = redis.call('ZRANGEBYSCORE', rkey, '-inf', tostring(ts - settle))
  if #settled > 0 then
    for _, v in ipairs(redis.call('HMGET', string.gsub(alloc_pattern, '{}', id), unpack(settled))) do
      if v then
        local a = cjson.decode(v)
        cpu = cpu - a.cpu
        memory = memory - a.memory
      end
    end
    if trim and settle > 0 then
      redis.call('ZREM', rkey, unpack(settled))
      redis.call('HSET', key, 'res_cpu', tostring(cpu), 'res_memory', tostring(memory))
    end
  end
  return cpu, memory
end
