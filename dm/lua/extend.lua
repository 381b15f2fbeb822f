-- extend a lock if it is still this token's: KEYS the lock; ARGV token, milliseconds. 1 if extended, else 0
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
