# File churn on tmpfs: random files written, copied, checksummed, removed.
n=0
while true; do
    dd if=/dev/urandom of=/tmp/f$((n % 24)) bs=64k count=16 2>/dev/null
    cp /tmp/f$((n % 24)) /tmp/copy
    md5sum /tmp/f* > /tmp/sums
    rm -f /tmp/copy
    n=$((n + 1))
done
