-- decide_many (after node.lua): take the placement lock and place many deployments in one call
-- (policies min, max): each is decided as decide.lua decides one, and allocated on its node at
-- once, so the next decision counts it (the caller releases the allocation of one whose registry
-- write is refused). KEYS as decide.lua; ARGV token, lock ms, settle, threshold, policy, node key
-- pattern, alloc pattern, recent pattern, time, then (dep id, cpu, memory, generation) for each. Returns
-- {'locked'}, or with the lock taken {'ok', node or '', score or '', ...} in the order given.
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'locked'} end
local settle, limit, want_max = tonumber(ARGV[3]), tonumber(ARGV[4]) + 1e-9, ARGV[5] == 'max'
local npat, apat, rpat, ts = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
ensure_index(KEYS[1], KEYS[3], KEYS[4], settle, npat, apat, rpat)
local out = {'ok'}
for i = 10, #ARGV, 4 do
  local dep, cpu, memory, gen = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local best, bscore = choose(KEYS[3], settle, tonumber(cpu), tonumber(memory), limit, want_max, npat, apat, rpat)
  if best then
    local record = cjson.encode({cpu = tonumber(cpu), memory = tonumber(memory), ts = tonumber(ts), gen = gen})
    allocate(string.gsub(apat, '{}', best), string.gsub(npat, '{}', best), string.gsub(rpat, '{}', best),
             dep, cpu, memory, ts, record)
    reindex(KEYS[3], npat, apat, rpat, settle, best)
    out[#out + 1] = best
    out[#out + 1] = tostring(bscore)
  else
    out[#out + 1] = ''
    out[#out + 1] = ''
  end
end
return out
