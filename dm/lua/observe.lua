-- observe: what the failure detector needs of every live node, in one call. KEYS the node set;
-- ARGV node key pattern, lease key pattern. Returns a flat list: per node in state up, starting
-- or stopping, its id, state, whether it has published a sample, when it registered, and
-- whether its lease is held (1/0). Nodes in other states cost a read of one field.
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = string.gsub(ARGV[1], '{}', id)
  local row = redis.call('HMGET', key, 'state', 'ts', 'since')
  local state = row[1]
  if state == 'up' or state == 'starting' or state == 'stopping' then
    local lease = redis.call('EXISTS', (string.gsub(ARGV[2], '{}', id)))
    out[#out + 1] = id
    out[#out + 1] = state
    out[#out + 1] = row[2] and '1' or '0'
    out[#out + 1] = row[3] or ''
    out[#out + 1] = tostring(lease)
  end
end
return out
