-- decide (after node.lua): take the placement lock and choose a node, in one call (policies min, max).
-- KEYS the node set, the lock; ARGV token, lock ms, settle, demand cpu, demand memory, threshold,
-- policy, node key pattern, alloc pattern, recent pattern. Returns {'locked'}, or with the lock
-- taken {'ok', id, score} or {'none'}. The same arithmetic as dm.balancer (its tests hold the
-- two side by side) on the same figures as snapshot.lua.
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'locked'} end
local settle = tonumber(ARGV[3])
local dcpu, dmem, limit = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]) + 1e-9
local want_max = ARGV[7] == 'max'
local function round6(x) return math.floor(x * 1e6 + 0.5) / 1e6 end
local function pct(amount, capacity) return amount / capacity * 100.0 end
local best, bscore, bn
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key, row = read_node(ARGV[8], id)
  local cpus, memory = tonumber(row[1] or ''), tonumber(row[2] or '')
  local state = row[3] or 'starting'
  if cpus and memory and cpus > 0 and memory > 0 and (state == 'up' or state == 'starting') then
    local rcpu, rmem = reserved(key, row, id, settle, ARGV[9], ARGV[10], true)
    rcpu, rmem = math.max(0, round6(rcpu)), math.max(0, round6(rmem))
    local ccpu = math.max(0, round6(tonumber(row[6] or '0') or 0))
    local cmem = math.max(0, round6(tonumber(row[7] or '0') or 0))
    local ecpu = math.max((tonumber(row[4] or '0') or 0) + pct(rcpu, cpus), pct(ccpu, cpus))
    local eram = math.max((tonumber(row[5] or '0') or 0) + pct(rmem, memory), pct(cmem, memory))
    if ecpu + pct(dcpu, cpus) <= limit and eram + pct(dmem, memory) <= limit then
      local score = 0
      if ecpu > 0 and eram > 0 then score = 1.0 / (1.0 / ecpu + 1.0 / eram) end
      local n = tonumber(row[8] or '0') or 0
      local key1 = want_max and -score or score
      local bkey = best and (want_max and -bscore or bscore)
      if not best or key1 < bkey or (key1 == bkey and (n < bn or (n == bn and id < best))) then
        best, bscore, bn = id, score, n
      end
    end
  end
end
if best then return {'ok', best, tostring(bscore)} end
return {'none'}
