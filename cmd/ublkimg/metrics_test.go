package main

import (
	"io"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"ublkimg/internal/promtest"
	"ublkimg/ublk"
)

// sampleScrape is a device served with qcow2 whose server answered (two
// queues, reads, writes and a flush) and one whose server is gone.
func sampleScrape() []deviceScrape {
	q := func(id int, reads, writes uint64) ublk.QueueStats {
		return ublk.QueueStats{Queue: id, InFlight: 1, Ops: map[string]ublk.OpStats{
			"read": {Requests: reads, Bytes: reads * 4096, LatencySumNs: reads * 30000,
				Latency: []ublk.HistBucket{{UpperNs: 24576, Count: reads / 2}, {UpperNs: 40960, Count: reads - reads/2}}},
			"write": {Requests: writes, Bytes: writes * 65536, Errors: 1, LatencySumNs: writes * 2_000_000,
				Latency: []ublk.HistBucket{{UpperNs: 2097152, Count: writes}}},
			"flush": {Requests: 3, Latency: []ublk.HistBucket{{UpperNs: 1 << 40, Count: 3}}},
		}}
	}
	return []deviceScrape{
		{rec: ublk.Record{ID: 0, Image: "/img/a.qcow2"}, stats: &ublk.DeviceStats{ID: 0, Device: "/dev/ublkb0",
			Image: "/img/a.qcow2", Format: "qcow2", UptimeNs: 5e9, Queues: []ublk.QueueStats{q(0, 100, 10), q(1, 50, 0)},
			FormatCounters: []ublk.Counter{{Name: "l2_cache_hits", Value: 7}, {Name: "cow_bytes", Value: 4096}}}},
		{rec: ublk.Record{ID: 1, Image: "/img/b.raw"}},
	}
}

// TestMetricsExposition: the endpoint's output, scraped over HTTP as
// Prometheus does, parses as Prometheus' text format (client_golang's
// parser is the oracle: ublkimg writes the format itself), passes promlint
// (units, _total counters), and holds the figures given: counts per queue
// and op, the histogram's cumulative buckets, up 0 for a device whose
// server is gone.
func TestMetricsExposition(t *testing.T) {
	srv := httptest.NewServer(metricsHandlerFor(sampleScrape))
	defer srv.Close()
	want := `
# HELP ublkimg_requests_total Requests served since the server started, by queue and operation.
# TYPE ublkimg_requests_total counter
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="discard",queue="0"} 0
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="discard",queue="1"} 0
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="flush",queue="0"} 3
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="flush",queue="1"} 3
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="read",queue="0"} 100
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="read",queue="1"} 50
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="write",queue="0"} 10
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="write",queue="1"} 0
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="write-zeroes",queue="0"} 0
ublkimg_requests_total{device="ublkb0",image="/img/a.qcow2",op="write-zeroes",queue="1"} 0
# HELP ublkimg_device_up Whether the server of the device answered this scrape (1) or not (0).
# TYPE ublkimg_device_up gauge
ublkimg_device_up{device="ublkb0",image="/img/a.qcow2"} 1
ublkimg_device_up{device="ublkb1",image="/img/b.raw"} 0
# HELP ublkimg_qcow2_cow_bytes_total The qcow2 driver's cow_bytes counter.
# TYPE ublkimg_qcow2_cow_bytes_total counter
ublkimg_qcow2_cow_bytes_total{device="ublkb0",image="/img/a.qcow2"} 4096
`
	if err := testutil.ScrapeAndCompare(srv.URL+"/metrics", strings.NewReader(want), "ublkimg_requests_total",
		"ublkimg_device_up", "ublkimg_qcow2_cow_bytes_total"); err != nil {
		t.Error(err)
	}

	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("Content-Type %q, want Prometheus' text format 0.0.4", ct)
	}
	checkExposition(t, string(body), map[string]float64{
		`ublkimg_request_duration_seconds_bucket{device="ublkb0",image="/img/a.qcow2",op="read",queue="0",le="3.2768e-05"}`:    50,
		`ublkimg_request_duration_seconds_bucket{device="ublkb0",image="/img/a.qcow2",op="read",queue="0",le="6.5536e-05"}`:    100,
		`ublkimg_request_duration_seconds_count{device="ublkb0",image="/img/a.qcow2",op="read",queue="0"}`:                     100,
		`ublkimg_request_duration_seconds_bucket{device="ublkb0",image="/img/a.qcow2",op="flush",queue="0",le="+Inf"}`:         3,
		`ublkimg_request_duration_seconds_bucket{device="ublkb0",image="/img/a.qcow2",op="flush",queue="0",le="34.359738368"}`: 0,
		`ublkimg_request_bytes_total{device="ublkb0",image="/img/a.qcow2",op="write",queue="0"}`:                               655360,
	})
}

// TestMetricsEscaping: label values with a quote, a backslash and a
// newline (an image name may hold any of them) come out escaped, so that
// the scrape still parses and the parser gives the value back.
func TestMetricsEscaping(t *testing.T) {
	image := "/img/a \"b\"\\c\nd.raw"
	source := func() []deviceScrape { return []deviceScrape{{rec: ublk.Record{ID: 3, Image: image}}} }
	srv := httptest.NewServer(metricsHandlerFor(source))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.LegacyValidation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("not Prometheus' text format: %v", err)
	}
	up := mfs["ublkimg_device_up"]
	if up == nil || len(up.Metric) != 1 {
		t.Fatalf("ublkimg_device_up: %v", up)
	}
	for _, l := range up.Metric[0].Label {
		if l.GetName() == "image" && l.GetValue() != image {
			t.Errorf("image label %q, want %q", l.GetValue(), image)
		}
	}
}

// checkExposition parses text as Prometheus' text format, lints it and
// checks the samples in want.
func checkExposition(t *testing.T, text string, want map[string]float64) {
	t.Helper()
	promtest.Check(t, text)
	for sample, v := range want {
		found := false
		for line := range strings.Lines(text) {
			if name, val, ok := strings.Cut(strings.TrimSpace(line), " "); ok && name == sample {
				found = true
				if f, err := strconv.ParseFloat(val, 64); err != nil || f != v {
					t.Errorf("%s = %s, want %v", sample, val, v)
				}
			}
		}
		if !found {
			t.Errorf("no sample %s", sample)
		}
	}
}
