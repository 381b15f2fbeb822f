-- decide (after node.lua): take the placement lock and choose a node, in one call (policies min, max).
-- KEYS the node set, the lock, the placement index, its settle time; ARGV token, lock ms, settle, demand cpu, demand
-- memory, threshold, policy, node key pattern, alloc pattern, recent pattern. Returns {'locked'}, or
-- with the lock taken {'ok', id, score} or {'none'}. The same arithmetic as dm.balancer (its tests
-- hold the two side by side) on the same figures as snapshot.lua.
--
-- The index holds every node that takes work by its score, kept current by every change of a
-- node's figures (a sample, an allocation, a release, a state: see dm/fleet.py), so the nodes are
-- read in score order and the walk ends at the first that fits, once the nodes of the same score
-- are seen (ties go to fewer deployments, then the lower id): the cost is that of the nodes too
-- full for this demand, not of the fleet.
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'locked'} end
local settle = tonumber(ARGV[3])
local dcpu, dmem, limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]) + 1e-9
local want_max = ARGV[7] == 'max'
if redis.call('ZCARD', KEYS[3]) == 0 or tonumber(redis.call('GET', KEYS[4]) or '-1') ~= settle then
  -- no index yet (a new store, or one from before it), or scores of another settle time: build it
  redis.call('SET', KEYS[4], ARGV[3])
  redis.call('DEL', KEYS[3])
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    reindex(KEYS[3], ARGV[8], ARGV[9], ARGV[10], settle, id)
  end
end
local best, bscore, bn
local start, batch, done = 0, 32, false
while not done do
  local page
  if want_max then
    page = redis.call('ZREVRANGE', KEYS[3], start, start + batch - 1, 'WITHSCORES')
  else
    page = redis.call('ZRANGE', KEYS[3], start, start + batch - 1, 'WITHSCORES')
  end
  if #page == 0 then break end
  for i = 1, #page, 2 do
    local id, indexed = page[i], tonumber(page[i + 1])
    if best and indexed ~= bscore then done = true break end
    local key, row = read_node(ARGV[8], id)
    local f = figures(key, row, id, settle, ARGV[9], ARGV[10], true)
    if not f then
      redis.call('ZREM', KEYS[3], id)  -- a node that takes no work any more
    else
      if f.score ~= indexed then redis.call('ZADD', KEYS[3], f.score, id) end
      if f.ecpu + pct(dcpu, f.cpus) <= limit and f.eram + pct(dmem, f.memory) <= limit then
        if not best or f.score ~= bscore then
          if not best then best, bscore, bn = id, f.score, f.n end
        elseif f.n < bn or (f.n == bn and id < best) then
          best, bn = id, f.n
        end
      end
    end
  end
  start = start + batch
end
if best then return {'ok', best, tostring(bscore)} end
return {'none'}
