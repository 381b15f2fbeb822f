-- the prelude of snapshot.lua, decide.lua and index.lua: read a node, compute (and trim) its
-- reserved demand, and its effective usage and score: one arithmetic for all three
-- a node's hash fields placement reads: cpus, memory, state, cpu, ram, alloc_cpu,
-- alloc_memory, alloc_n, ts, res_cpu, res_memory
local function read_node(pattern, id)
  local key = string.gsub(pattern, '{}', id)
  return key, redis.call('HMGET', key, 'cpus', 'memory', 'state', 'cpu', 'ram',
                         'alloc_cpu', 'alloc_memory', 'alloc_n', 'ts', 'res_cpu', 'res_memory')
end
-- the node's reserved cpu and memory: what was placed after its last sample minus settle.
-- With ``trim`` (placement and every reindex, which write anyway) allocations older than that
-- leave the recent set and its totals, so the cost grows only with what was placed since;
-- without it (a snapshot for a reader) it is a look that changes nothing. A reindex that did
-- not trim read every settled allocation again at each sample of a node no placement chose
-- since (1,000 of them: 15 ms of Redis a sample, measured).
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
local function round6(x) return math.floor(x * 1e6 + 0.5) / 1e6 end
local function pct(amount, capacity) return amount / capacity * 100.0 end
-- a node that takes work: cpus, memory, effective cpu and ram (percent: the last sample plus
-- what was reserved since, or what is committed, whichever is more), its score
-- (load = 1 / (1/cpu + 1/ram), 0 where either is 0) and its deployments; nil otherwise
local function figures(key, row, id, settle, alloc_pattern, recent_pattern, trim)
  local cpus, memory = tonumber(row[1] or ''), tonumber(row[2] or '')
  local state = row[3] or 'starting'
  if not (cpus and memory and cpus > 0 and memory > 0 and (state == 'up' or state == 'starting')) then
    return nil
  end
  local rcpu, rmem = reserved(key, row, id, settle, alloc_pattern, recent_pattern, trim)
  rcpu, rmem = math.max(0, round6(rcpu)), math.max(0, round6(rmem))
  local ccpu = math.max(0, round6(tonumber(row[6] or '0') or 0))
  local cmem = math.max(0, round6(tonumber(row[7] or '0') or 0))
  local ecpu = math.max((tonumber(row[4] or '0') or 0) + pct(rcpu, cpus), pct(ccpu, cpus))
  local eram = math.max((tonumber(row[5] or '0') or 0) + pct(rmem, memory), pct(cmem, memory))
  local score = 0
  if ecpu > 0 and eram > 0 then score = 1.0 / (1.0 / ecpu + 1.0 / eram) end
  return {cpus = cpus, memory = memory, ecpu = ecpu, eram = eram, score = score, n = tonumber(row[8] or '0') or 0}
end
-- a node's entry in the placement index: its deployment count (zero-padded) and id, so nodes of
-- the same score come in the tie-break's order (fewer deployments, then the lower id), and the
-- least-loaded walk stops at the first that fits however many nodes share its score (an empty
-- fleet of one kind of machine: all of them)
local function index_member(n, id) return string.format('%09d', n) .. '|' .. id end
local function member_id(member)
  local bar = string.find(member, '|', 1, true)
  if bar then return string.sub(member, bar + 1), tonumber(string.sub(member, 1, bar - 1)) end
  return member, nil
end
-- set a node's entry (score and member) in the index, or take it out (f nil); the member in use
-- is kept in the node's hash (``imember``), so a change of count replaces it
local function set_entry(index, key, id, f, old)
  old = old or redis.call('HGET', key, 'imember')
  if f then
    local member = index_member(f.n, id)
    if old and old ~= member then redis.call('ZREM', index, old) end
    redis.call('ZADD', index, f.score, member)
    if old ~= member then redis.call('HSET', key, 'imember', member) end
  elseif old then
    redis.call('ZREM', index, old)
    redis.call('HDEL', key, 'imember')
  end
end
-- put a node in the placement index (sorted by score) if it takes work, else take it out
local function reindex(index, node_pattern, alloc_pattern, recent_pattern, settle, id)
  local key, row = read_node(node_pattern, id)
  local f = figures(key, row, id, settle, alloc_pattern, recent_pattern, true)
  set_entry(index, key, id, f, nil)
end
-- build the placement index when it is missing (a new store) or scored for another settle time
local function ensure_index(nodes, index, settle_key, settle, node_pattern, alloc_pattern, recent_pattern)
  if redis.call('ZCARD', index) == 0 or tonumber(redis.call('GET', settle_key) or '-1') ~= settle then
    redis.call('SET', settle_key, tostring(settle))
    redis.call('DEL', index)
    for _, id in ipairs(redis.call('SMEMBERS', nodes)) do
      reindex(index, node_pattern, alloc_pattern, recent_pattern, settle, id)
    end
  end
end
-- choose a node for a demand by the policies min (want_max false) or max: its id and score, or nil.
-- The index holds every node that takes work by its score (and, among equal scores, in the
-- tie-break's order: see index_member), kept current by every change of a node's figures (a
-- sample, an allocation, a release, a state: see dm/fleet), so the nodes are read in score order
-- and the walk ends at the first that fits (for max, once the nodes of the same score are seen,
-- which come in reverse): the cost is that of the nodes too full for this demand, not of the fleet.
-- An entry found stale (the node's figures moved since) is corrected as it is read.
local function choose(index, settle, dcpu, dmem, limit, want_max, node_pattern, alloc_pattern, recent_pattern)
  local best, bscore, bn
  local start, batch, done = 0, 32, false
  while not done do
    local page
    if want_max then
      page = redis.call('ZREVRANGE', index, start, start + batch - 1, 'WITHSCORES')
    else
      page = redis.call('ZRANGE', index, start, start + batch - 1, 'WITHSCORES')
    end
    if #page == 0 then break end
    local stale = 0
    for i = 1, #page, 2 do
      local member, indexed = page[i], tonumber(page[i + 1])
      local id, n = member_id(member)
      if best and indexed ~= bscore then done = true break end
      local key, row = read_node(node_pattern, id)
      local f = figures(key, row, id, settle, alloc_pattern, recent_pattern, true)
      local fresh = f and f.score == indexed and f.n == n
      if not fresh then
        set_entry(index, key, id, f, member)  -- it moves in the index: the ranks after it shift
        stale = stale + 1
      end
      if f and f.ecpu + pct(dcpu, f.cpus) <= limit and f.eram + pct(dmem, f.memory) <= limit then
        if not best then
          best, bscore, bn = id, f.score, f.n
          -- least-loaded: the first that fits is the one, its entry being current (the ones of
          -- its score after it have as many deployments or more)
          if fresh and not want_max then done = true break end
        elseif f.score == bscore and (f.n < bn or (f.n == bn and id < best)) then
          best, bn = id, f.n
        end
      end
    end
    start = start + batch - stale
  end
  return best, bscore
end
-- record a deployment's demand on a node: its alloc hash, node hash and recent set. The node
-- hash keeps running totals: alloc_* of every allocation, res_* of the recent ones.
local function allocate(akey, nkey, rkey, dep, cpu, memory, ts, record)
  local old = redis.call('HGET', akey, dep)
  if old then
    local a = cjson.decode(old)
    redis.call('HINCRBYFLOAT', nkey, 'alloc_cpu', tostring(-a.cpu))
    redis.call('HINCRBYFLOAT', nkey, 'alloc_memory', tostring(-a.memory))
    if redis.call('ZREM', rkey, dep) == 1 then
      redis.call('HINCRBYFLOAT', nkey, 'res_cpu', tostring(-a.cpu))
      redis.call('HINCRBYFLOAT', nkey, 'res_memory', tostring(-a.memory))
    end
  else
    redis.call('HINCRBY', nkey, 'alloc_n', 1)
  end
  redis.call('HSET', akey, dep, record)
  redis.call('HINCRBYFLOAT', nkey, 'alloc_cpu', cpu)
  redis.call('HINCRBYFLOAT', nkey, 'alloc_memory', memory)
  redis.call('ZADD', rkey, ts, dep)
  redis.call('HINCRBYFLOAT', nkey, 'res_cpu', cpu)
  redis.call('HINCRBYFLOAT', nkey, 'res_memory', memory)
end
