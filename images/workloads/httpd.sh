# busybox httpd serving generated pages, fetched in a loop by wget.
mkdir -p /tmp/www
i=0
while [ $i -lt 200 ]; do
    seq $((i * 50)) $((i * 50 + 400)) | awk '{ printf "<p>row %d: %x</p>\n", $1, $1 * 2654435761 }' > /tmp/www/page$i.html
    i=$((i + 1))
done
httpd -p 127.0.0.1:8080 -h /tmp/www
while true; do
    j=0
    while [ $j -lt 200 ]; do
        wget -q -O /tmp/fetched.html http://127.0.0.1:8080/page$j.html
        j=$((j + 7))
    done
done
