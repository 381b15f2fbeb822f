-- counts: each live node's deployments, for scale-in. KEYS the node set; ARGV node key pattern.
-- Returns a flat list: per node in state up, starting or stopping, its id, state and
-- deployments (alloc_n). Two fields a node: lighter than a snapshot.
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local row = redis.call('HMGET', (string.gsub(ARGV[1], '{}', id)), 'state', 'alloc_n')
  local state = row[1]
  if state == 'up' or state == 'starting' or state == 'stopping' then
    out[#out + 1] = id
    out[#out + 1] = state
    out[#out + 1] = row[2] or '0'
  end
end
return out
