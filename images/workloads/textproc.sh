# Sort, count and reshape generated records with awk, sort and uniq.
seq 1 300000 | awk '{ srand($1); print int(rand() * 5000), $1 % 13, $1 }' > /tmp/records.txt
while true; do
    sort -n /tmp/records.txt | uniq -c -w 4 > /tmp/counts.txt
    awk '{ s[$2] += $3 } END { for (k in s) print k, s[k] }' /tmp/records.txt | sort > /tmp/sums.txt
    sed 's/ /,/g' /tmp/records.txt | tail -n 1000 > /tmp/tail.csv
done
