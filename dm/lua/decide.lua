-- decide (after node.lua): take the placement lock and choose a node, in one call (policies min, max).
-- KEYS the node set, the lock, the placement index, its settle time; ARGV token, lock ms, settle, demand cpu, demand
-- memory, threshold, policy, node key pattern, alloc pattern, recent pattern. Returns {'locked'}, or
-- with the lock taken {'ok', id, score} or {'none'}. The same arithmetic as dm.balancer (its tests
-- hold the two side by side) on the same figures as snapshot.lua.
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'locked'} end
local settle = tonumber(ARGV[3])
ensure_index(KEYS[1], KEYS[3], KEYS[4], settle, ARGV[8], ARGV[9], ARGV[10])
local best, bscore = choose(KEYS[3], settle, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]) + 1e-9,
                            ARGV[7] == 'max', ARGV[8], ARGV[9], ARGV[10])
if best then return {'ok', best, tostring(bscore)} end
return {'none'}
